"""The open door: register_operator / register_scheme / register_config / register_dataset accept what they should,
refuse duplicates and wrong types by name, and `--import MODULE` makes the additions reachable from every command."""
import sys
import textwrap

import pytest
import torch

from operators import OPERATORS, ConvOperator, make_operator, register_operator
from operators.stability import SCHEMES as CONTRACTS
from operators.stability import Scheme
from pdenet import (SCHEMES, LayerBlock, TimeSteppingBlock, build_block, build_model, register_config,
                    register_dataset, register_scheme)
from pdenet.cli import main
from pdenet.configs import CONFIGS
from pdenet.data.registry import DATASETS, EVAL_SPLITS, eval_split


@pytest.fixture
def registries():
    """Remove whatever a test registers."""
    before = {id(r): set(r) for r in (OPERATORS, SCHEMES, CONTRACTS, CONFIGS, DATASETS, EVAL_SPLITS)}
    yield
    for registry in (OPERATORS, SCHEMES, CONTRACTS, CONFIGS, DATASETS, EVAL_SPLITS):
        for name in set(registry) - before[id(registry)]:
            del registry[name]


class ScaledIdentity(ConvOperator):
    """``K = a I`` (c -> c): the smallest complete operator."""

    kind = "test-scaled-identity"

    def __init__(self, in_channels, out_channels, boundary="zeros"):
        super().__init__(in_channels, out_channels, 1, boundary)
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def _forward(self, x):
        return self.a * x

    def _adjoint(self, y):
        return self.a * y

    def _symbol(self, n1, n2):
        return (self.a * torch.eye(self.in_channels)).to(torch.complex64).expand(n1, n2, -1, -1)

    def macs_per_pixel(self):
        return self.in_channels


def test_register_operator(registries):
    assert register_operator(ScaledIdentity) is ScaledIdentity
    op = make_operator("test-scaled-identity", 3, 3)
    assert op.check_adjoint() < 1e-6 and op.spectral_norm((4, 4)) == pytest.approx(0.7, rel=1e-6)
    block = build_block("parabolic", 3, nt=1, operator="test-scaled-identity")
    assert block.step_bound((4, 4)) == pytest.approx(2 / 0.49, rel=1e-5)
    with pytest.raises(ValueError, match="'test-scaled-identity' is already registered"):
        register_operator(ScaledIdentity)
    with pytest.raises(TypeError, match="subclass of operators.ConvOperator"):
        register_operator(torch.nn.Conv2d)

    class NoKind(ScaledIdentity):
        kind = ConvOperator.kind

    with pytest.raises(TypeError, match="must set the class attribute kind"):
        register_operator(NoKind)

    class Incomplete(ConvOperator):
        kind = "test-incomplete"

        def _forward(self, x):
            return x

    with pytest.raises(TypeError, match="must implement _adjoint, _symbol, macs_per_pixel"):
        register_operator(Incomplete)


def test_make_operator_names_unknown_options():
    with pytest.raises(ValueError, match=r"'dense' operator takes no option\(s\) stencil; it takes: kernel_size"):
        make_operator("dense", 2, 2, stencil="cross")


class Midpoint(LayerBlock):
    scheme = "test-midpoint"
    contract = Scheme("test-midpoint", "explicit midpoint", lambda z: 1 + z + z * z / 2, order=2)

    def step(self, j, y):
        f = self.weights(j)
        return y + self.h * f(y + self.h / 2 * f(y))


def test_register_scheme_gives_block_and_contract(registries):
    assert register_scheme(Midpoint) is Midpoint
    assert CONTRACTS["test-midpoint"] is Midpoint.contract
    torch.manual_seed(0)
    block = build_block("test-midpoint", 3, nt=2, h=0.1, operator="dense",
                        operator_kwargs={"boundary": "circular"}).double()
    norm = block.weights(0).op.spectral_norm((5, 5))
    assert block.step_bound((5, 5)) == pytest.approx(2 / norm ** 2, rel=1e-10)  # real interval [−2, 0] from R
    terms = block.linearizations(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert [t.scheme for t in terms] == ["test-midpoint"] * 2
    with pytest.raises(ValueError, match="scheme named 'test-midpoint' is already registered"):
        register_scheme(Midpoint)


def test_register_scheme_errors(registries):
    with pytest.raises(TypeError, match="subclass of pdenet.TimeSteppingBlock"):
        register_scheme(torch.nn.Module)

    class Nameless(Midpoint):
        scheme = ""

    with pytest.raises(TypeError, match="scheme must be a non-empty string"):
        register_scheme(Nameless)

    class NoStep(LayerBlock):
        scheme = "test-nostep"
        contract = "parabolic"

    with pytest.raises(TypeError, match="must implement step"):
        register_scheme(NoStep)

    class NoContract(TimeSteppingBlock):
        scheme = "test-nocontract"

        def step(self, j, y):
            return y

    with pytest.raises(TypeError, match="has no stability contract"):
        register_scheme(NoContract)

    class UnknownContract(Midpoint):
        scheme = "test-unknown-contract"
        contract = "rk7"

    with pytest.raises(ValueError, match="unknown scheme 'rk7'"):
        register_scheme(UnknownContract)

    class Clash(Midpoint):
        scheme = "test-clash"
        contract = Scheme("rk4", "not the real RK4", lambda z: 1 + z)

    with pytest.raises(ValueError, match="different stability contract of that name"):
        register_scheme(Clash)
    assert "test-clash" not in SCHEMES


def test_register_config_and_switch_operator_by_name(registries):
    from pdenet.networks import PDEResNet

    config = register_config("test-pde", PDEResNet, "a small PDE-ResNet", {"widths": (4, 8), "nt": 1})
    assert CONFIGS["test-pde"] is config
    model = build_model("test-pde", in_channels=1, operator="dense")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="'test-pde' is already registered"):
        register_config("test-pde", PDEResNet, "again")
    with pytest.raises(ValueError, match=r"takes no option\(s\) depth"):
        register_config("test-bad", PDEResNet, "bad", {"depth": 3})
    with pytest.raises(TypeError, match="must take the keywords num_classes, in_channels"):
        register_config("test-bad", lambda width: None, "no classes")
    with pytest.raises(TypeError, match="builder must be a class or function"):
        register_config("test-bad", 3, "not callable")
    with pytest.raises(ValueError, match="dense twin 'nope'"):
        register_config("test-bad", PDEResNet, "twin", dense_twin="nope")
    with pytest.raises(ValueError, match="unknown task"):
        register_config("test-bad", PDEResNet, "task", task="detection")
    assert "test-bad" not in CONFIGS
    # a lean configuration switched to another kind by name alone: its lean options are not passed on
    for name in ("lean-resnet20", "pde-rk4-lean"):
        for kind in ("dense", "grouped", "separable"):
            model = build_model(name, operator=kind)
            kinds = {m.kind for m in model.modules() if isinstance(m, ConvOperator)}
            assert "lean" not in kinds and kind in kinds
    with pytest.raises(ValueError, match=r"'dense' operator takes no option\(s\) stencil"):
        build_model("lean-resnet20", operator="dense", operator_kwargs={"stencil": "cross"})


def test_register_dataset(registries):
    def loader(split, data_dir=None):
        raise FileNotFoundError("no files")

    assert register_dataset("test-data", loader, eval_split="val") is loader
    assert DATASETS["test-data"] is loader and eval_split("test-data") == "val"
    with pytest.raises(ValueError, match="'test-data' is already registered"):
        register_dataset("test-data", loader)
    with pytest.raises(TypeError, match="loader must be callable"):
        register_dataset("test-other", "loader")
    decorated = register_dataset("test-decorated")(loader)
    assert decorated is loader and DATASETS["test-decorated"] is loader


EXTENSION = textwrap.dedent('''
    import torch
    from operators.stability import Scheme
    from pdenet import Dataset, LayerBlock, register_config, register_dataset, register_scheme
    from pdenet.networks import PDEResNet


    @register_scheme
    class CliMidpoint(LayerBlock):
        scheme = "cli-midpoint"
        contract = Scheme("cli-midpoint", "explicit midpoint", lambda z: 1 + z + z * z / 2)

        def step(self, j, y):
            f = self.weights(j)
            return y + self.h * f(y + self.h / 2 * f(y))


    @register_dataset("cli-stripes")
    def load(split, data_dir=None):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        labels = torch.randint(2, (64,), generator=g)
        images = torch.randint(0, 50, (64, 1, 8, 8), generator=g)
        images[labels == 1, 0, 2:5, :] += 150
        return Dataset("cli-stripes", split, images.to(torch.uint8), labels, 2, ("off", "on"), (0.2,), (0.3,))


    register_config("cli-pde", PDEResNet, "tiny", {"widths": (4,), "scheme": "cli-midpoint", "nt": 1, "h": 0.2,
                                                  "operator": "dense"})
''')


def test_import_option_reaches_every_command(tmp_path, monkeypatch, capsys, registries):
    (tmp_path / "cli_extension.py").write_text(EXTENSION)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        run = ["--import", "cli_extension"]
        assert main(["train", *run, "--config", "cli-pde", "--data", "cli-stripes", "--epochs", "1", "--batch-size",
                     "16", "--threads", "1", "--no-progress", "--out", "out"]) == 0
        assert "cli-midpoint" in capsys.readouterr().out
        assert main(["evaluate", *run, "out"]) == 0
        assert main(["stability", *run, "out"]) == 0
        assert main(["cost", *run, "--config", "cli-pde", "--input-shape", "1", "8", "8", "--repeats", "2"]) == 0
        assert main(["stability", *run, "--config", "cli-pde", "--input-shape", "1", "8", "8"]) == 0
    finally:
        sys.modules.pop("cli_extension", None)
    assert main(["cost", "--import", "no_such_module_here", "--config", "x"]) == 2
    assert "--import failed: ModuleNotFoundError" in capsys.readouterr().err
