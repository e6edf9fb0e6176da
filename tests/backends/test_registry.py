import pytest

from backends.registry import BackendChoice, BackendUnavailable, select_backend


class FakeProbe:
    def __init__(self, packages=("torch", "mlx"), cuda=False, metal=False, bf16=True):
        self.packages, self.cuda, self.metal, self.bf16 = set(packages), cuda, metal, bf16

    def has_package(self, name):
        return name in self.packages

    def cuda_available(self):
        return self.cuda

    def cuda_bf16(self):
        return self.bf16

    def metal_available(self):
        return self.metal


def choose(env=None, **kwargs):
    probe = FakeProbe(
        **{k: kwargs.pop(k) for k in list(kwargs) if k in ("packages", "cuda", "metal", "bf16")}
    )
    return select_backend(env=env or {}, probe=probe, **kwargs)


@pytest.mark.parametrize(
    "probe, expected",
    [
        (dict(cuda=True), ("torch", "cuda", "bfloat16")),
        (dict(cuda=True, bf16=False), ("torch", "cuda", "float16")),
        (dict(metal=True), ("mlx", "metal", "bfloat16")),
        (dict(), ("torch", "cpu", "float32")),
        (dict(packages=["mlx"]), ("mlx", "cpu", "float32")),
    ],
)
def test_automatic_choice(probe, expected):
    choice = choose(**probe)
    assert (choice.backend, choice.device, choice.compute_dtype) == expected
    assert choice.describe().startswith(f"backend {expected[0]}, device {expected[1]}")


def test_overrides_arguments_beat_environment_beat_detection():
    assert choose(cuda=True, backend="mlx").device == "cpu"
    assert choose(env={"NF4_BACKEND": "mlx"}).backend == "mlx"
    assert choose(env={"NF4_BACKEND": "mlx"}, backend="torch").backend == "torch"
    assert choose(cuda=True, device="cpu").device == "cpu"
    assert choose(cuda=True, env={"NF4_DEVICE": "cuda:1"}).device == "cuda:1"
    assert choose(env={"NF4_COMPUTE_DTYPE": "bfloat16"}).compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(packages=["torch"], backend="mlx"), r"pip install -e '\.\[mlx\]'"),
        (dict(packages=[]), "no backend is installed"),
        (dict(device="cuda"), "no CUDA GPU is usable"),
        (dict(device="metal"), "no Apple GPU is usable"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(backend="jax"), "unknown backend 'jax'"),
        (dict(cuda=True, backend="mlx", device="cuda"), "mlx backend has no CUDA"),
    ],
)
def test_requests_that_cannot_be_met_say_why(kwargs, message):
    with pytest.raises(BackendUnavailable, match=message):
        choose(**kwargs)


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="unknown compute dtype 'int8'"):
        choose(compute_dtype="int8")


def test_the_real_probe_runs_on_this_machine():
    choice = select_backend(env={})
    assert isinstance(choice, BackendChoice) and choice.backend in ("torch", "mlx")
