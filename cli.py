"""Command-line interface. The subcommands (finetune, quantize, generate, eval, merge, info) arrive with
the CLI issue; this is the entry point they hang from."""

import click


@click.group()
@click.version_option(package_name="nf4-qlora")
def main() -> None:
    """QLoRA fine-tuning with bitsandbytes-exact NF4 weights."""


if __name__ == "__main__":
    main()
