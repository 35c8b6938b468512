"""Named model configurations, for Python and the command line.

``build_model("lean-resnet20", num_classes=10, in_channels=1)`` builds a network by name; keyword overrides
replace the configuration's defaults (``build_model("pde-parabolic-lean", nt=2, h=0.5)``) and are checked
against the network class's keywords. ``list_configs()`` names them all, ``describe(name)`` explains one,
``parse_overrides(["nt=2", "operator=grouped"])`` turns command-line ``key=value`` pairs into keywords.
``register_config`` adds a configuration of your own (reachable from the command line with ``--import``).

Width and depth are knobs of every built-in family (``build_model("lean-resnet20", width=1.5, depth=32)``, on
the command line ``--width 1.5 --depth 32``): see :class:`Knobs`, ``WIDTH_HELP`` and ``DEPTH_HELP``.

Switching the operator by name alone (``build_model("lean-resnet20", operator="dense")``) drops the
configuration's ``operator_kwargs``, which belong to its own operator kind; give ``operator_kwargs`` too to set
the new kind's options.

Every lean configuration has a dense twin (``dense_twin``): the same network with dense 3x3 operators.
"""
from __future__ import annotations

import ast
import inspect
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Sequence

from torch import nn

from .networks import MobileNetV2, PDEResNet, ResNet, ShuffleNetV2
from .networks.resnet import CIFAR_WIDTHS, IMAGENET_WIDTHS, RESNET18_DEPTHS, RESNET34_DEPTHS, cifar_depths

#: Keywords of the lean operator used by the lean configurations: 5-point stencil, ungrouped 1x1 coupling.
LEAN_KWARGS = {"stencil": "cross", "groups": 1}
#: The same with the full 9-point stencil (``lean-resnet20-full``).
LEAN_FULL_KWARGS = {"stencil": "full", "groups": 1}
#: Keywords every builder takes from ``build_model`` itself.
COMMON_KEYWORDS = ("num_classes", "in_channels")
#: What ``depth`` means, by kind: the keyword it sets, and how.
DEPTH_KINDS = {
    "cifar": ("depths", "a CIFAR ResNet of 6n + 2 layers (20, 32, 44, 56, 110, ...), n basic blocks per stage"),
    "imagenet": ("depths", "the ResNet-18 (2, 2, 2, 2) or ResNet-34 (3, 4, 6, 3) layout of basic blocks"),
    "nt": ("nt", "time steps per stage, each of the configuration's step size h (the final time nt h grows with "
                 "it; set h with an override to keep it)"),
}
IMAGENET_DEPTHS = {18: RESNET18_DEPTHS, 34: RESNET34_DEPTHS}
WIDTH_HELP = ("width multiplier: ResNets, PDE-ResNets and segmentation nets scale their stage widths by it (CIFAR "
              "ResNets 16/32/64 x W), rounded to an integer multiple of the operator's coupling groups; "
              "MobileNetV2 and ShuffleNetV2 take it as their width_mult (default 1)")
DEPTH_HELP = ("depth: CIFAR ResNets their 6n + 2 layers (20, 32, 44, 56, ...); the ResNet-18/34 layouts 18 or 34; "
              "PDE-ResNets and segmentation nets the number of time steps per stage (nt; the step size h stays, so "
              "the final time nt h grows); MobileNetV2 and ShuffleNetV2 have no depth knob")


@dataclass(frozen=True)
class Knobs:
    """How ``width`` and ``depth`` become a configuration's own keywords.

    ``width_keys``: the channel counts ``width`` multiplies (each an int or a sequence of stage widths; every
    product is rounded to a multiple of the operator's ``groups``, and one that rounds to 0 is an error); or
    ``("width_mult",)``, the network's own width multiplier, which ``width`` then sets. ``depth``: a key of
    ``DEPTH_KINDS``, or ``None`` for a family without a depth knob.
    """

    width_keys: tuple[str, ...] = ("widths",)
    depth: str | None = None

    def describe(self) -> list[str]:
        """Lines for :func:`describe`: what the knobs set."""
        width = ("width: the width multiplier width_mult" if self.width_keys == ("width_mult",)
                 else f"width: multiplies {', '.join(self.width_keys)}")
        depth = f"depth: {DEPTH_KINDS[self.depth][1]}" if self.depth else "depth: none (this family has no depth knob)"
        return [width, depth]

    def overrides(self, name: str, kwargs: dict, given: dict, width, depth) -> dict:
        """The keywords that ``width`` and ``depth`` (``None``: not given) set, for configuration ``name`` with
        resolved keywords ``kwargs``; ``given`` are the explicit overrides, which must not set them too."""
        out = {}
        if width is not None:
            width = _check_width(name, width)
            _no_conflict(name, "width", width, self.width_keys, given)
            if self.width_keys == ("width_mult",):
                out["width_mult"] = width
            else:
                multiple = (kwargs.get("operator_kwargs") or {}).get("groups", 1)
                out.update({key: _scaled(name, key, kwargs[key], width, multiple) for key in self.width_keys})
        if depth is not None:
            if self.depth is None:
                raise ValueError(f"configuration {name!r} has no depth knob (its family scales by width only; its "
                                 f"options: {', '.join(get_config(name).keywords())})")
            key = DEPTH_KINDS[self.depth][0]
            _no_conflict(name, "depth", depth, (key,), given)
            out[key] = _depth_value(name, self.depth, depth)
        return out


def _check_width(name: str, width) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise TypeError(f"configuration {name!r}: width must be a number (a width multiplier), got {width!r}")
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"configuration {name!r}: width must be a positive finite number, got {width!r}")
    return float(width)


def _no_conflict(name: str, knob: str, value, keys: tuple[str, ...], given: dict) -> None:
    both = [k for k in keys if k in given]
    if both:
        raise ValueError(f"configuration {name!r}: {knob}={value!r} sets {', '.join(keys)}, and the override(s) "
                         f"{', '.join(f'{k}={given[k]!r}' for k in both)} set it too; give one or the other")


def _scaled(name: str, key: str, base, width: float, multiple: int):
    """``base`` (an int or a sequence of ints) times ``width``, each rounded to a positive multiple of
    ``multiple``; ``ValueError`` naming the smallest usable width when one rounds to 0."""
    values = [base] if isinstance(base, int) else list(base)
    scaled = [int(v * width / multiple + 0.5) * multiple for v in values]
    if min(scaled) < 1:
        smallest = multiple / (2 * min(values))
        raise ValueError(f"configuration {name!r}: width {width:g} rounds {key} {tuple(values)} to "
                         f"{tuple(scaled)}, a stage of 0 channels (multiples of {multiple}); the smallest width "
                         f"here is {smallest:.3g}")
    return scaled[0] if isinstance(base, int) else tuple(scaled)


def _depth_value(name: str, kind: str, depth):
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"configuration {name!r}: depth must be an integer, got {depth!r}")
    depth = int(depth)
    if kind == "cifar":
        try:
            return cifar_depths(depth)
        except ValueError as exc:
            raise ValueError(f"configuration {name!r}: {exc}") from None
    if kind == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"configuration {name!r}: depth must be one of {', '.join(map(str, IMAGENET_DEPTHS))} "
                             f"(the ResNet layouts of basic blocks), got {depth}")
        return IMAGENET_DEPTHS[depth]
    if depth < 1:
        raise ValueError(f"configuration {name!r}: depth (time steps per stage) must be a positive integer, "
                         f"got {depth}")
    return depth


@dataclass(frozen=True)
class ModelConfig:
    """A named network: ``builder(num_classes=..., in_channels=..., **defaults)``; ``task`` says what its
    output is: ``"classification"`` logits ``(B, num_classes)``, ``"segmentation"`` ``(B, num_classes, H, W)``."""

    name: str
    builder: type[nn.Module]
    description: str
    defaults: dict = field(default_factory=dict)
    dense_twin: str | None = None
    task: str = "classification"
    knobs: Knobs | None = None

    def keywords(self) -> tuple[str, ...]:
        """The keywords an override may set (the builder's, except ``num_classes`` and ``in_channels``)."""
        params = inspect.signature(self.builder).parameters
        return tuple(k for k in params if k not in COMMON_KEYWORDS)


def _resnets() -> list[ModelConfig]:
    configs = []
    for depth in (20, 32, 56):
        base = {"depths": cifar_depths(depth), "widths": CIFAR_WIDTHS, "stem": "small", "shortcut": "A"}
        knobs = Knobs(depth="cifar")
        configs += [
            ModelConfig(f"resnet{depth}", ResNet, f"CIFAR ResNet-{depth} (He et al.), dense 3x3 operators, "
                        "option-A shortcuts", {**base, "operator": "dense"}, knobs=knobs),
            ModelConfig(f"lean-resnet{depth}", ResNet, f"CIFAR ResNet-{depth} with every 3x3 convolution after "
                        "the stem a lean operator (1x1 + 5-point depthwise stencil)",
                        {**base, "operator": "lean", "operator_kwargs": dict(LEAN_KWARGS)},
                        dense_twin=f"resnet{depth}", knobs=knobs),
        ]
        if depth == 20:  # the lean ResNet-20 at the top of the measured lean frontier (docs/benchmarks.md)
            configs.append(ModelConfig(
                "lean-resnet20-full", ResNet, "CIFAR ResNet-20 with lean operators whose stencil is the full 3x3 "
                "square (1x1 + 9-point depthwise stencil): lean-resnet20's counted FLOPs, 4 parameters more per "
                "channel", {**base, "operator": "lean", "operator_kwargs": dict(LEAN_FULL_KWARGS)},
                dense_twin="resnet20", knobs=knobs))
    for depth, depths in ((18, RESNET18_DEPTHS), (34, RESNET34_DEPTHS)):
        base = {"depths": depths, "widths": IMAGENET_WIDTHS, "stem": "small", "shortcut": "B"}
        knobs = Knobs(depth="imagenet")
        configs += [
            ModelConfig(f"resnet{depth}", ResNet, f"ResNet-{depth} layout with a stride-1 3x3 stem for small "
                        "images, dense 3x3 operators, 1x1 projection shortcuts", {**base, "operator": "dense"},
                        knobs=knobs),
            ModelConfig(f"lean-resnet{depth}", ResNet, f"ResNet-{depth} layout (small-image stem) with lean 3x3 "
                        "operators", {**base, "operator": "lean", "operator_kwargs": dict(LEAN_KWARGS)},
                        dense_twin=f"resnet{depth}", knobs=knobs),
        ]
    return configs


def _pde_nets() -> list[ModelConfig]:
    base = {"widths": (32, 64, 112, 112), "nt": 3, "h": 1.0, "block_kwargs": {"normalization": "batch"}}
    stage = "PDE-ResNet (Ruthotto-Haber stages 32/64/112/112, 3 steps of h=1, batch norm in the layers)"
    layouts = {
        "parabolic": "forward Euler steps of the symmetric layer -K^T relu(BN(K Y + b))",
        "leapfrog": "leapfrog steps of the hyperbolic layer (second order in time, reversible)",
        "hamiltonian": "Verlet steps of the Hamiltonian layer pair (symplectic, reversible)",
        "rk2": "Heun (RK2) steps of the symmetric layer (two layer evaluations per step)",
        "rk4": "classical Runge-Kutta (RK4) steps of the symmetric layer (four layer evaluations per step)",
        "antisymmetric": "forward Euler steps of the antisymmetric layer relu(BN((K - K^T - 0.5 I) Y + b)), "
                         "h = 0.25 (its bound 2γ/(γ² + ‖K - K^T‖²) is about 0.3 at initialization)",
    }
    # forward Euler amplifies the oscillatory part of the antisymmetric layer at h = 1 (diverged in training)
    step_sizes = {"antisymmetric": 0.25}
    configs = []
    for scheme, what in layouts.items():
        own = {**base, "scheme": scheme, "h": step_sizes.get(scheme, base["h"])}
        configs += [
            ModelConfig(f"pde-{scheme}-dense", PDEResNet, f"{stage}: {what}, dense 3x3 operators",
                        {**own, "operator": "dense"}),
            ModelConfig(f"pde-{scheme}-lean", PDEResNet, f"{stage}: {what}, lean operators",
                        {**own, "operator": "lean", "operator_kwargs": dict(LEAN_KWARGS)},
                        dense_twin=f"pde-{scheme}-dense"),
        ]
    for scheme in ("leapfrog", "hamiltonian"):
        configs.append(ModelConfig(
            f"pde-{scheme}-reversible", PDEResNet,
            f"{stage}: {layouts[scheme]}, lean operators, reversible backpropagation (states reconstructed in "
            "the backward pass: activation memory flat in nt)",
            {**base, "scheme": scheme, "operator": "lean", "operator_kwargs": dict(LEAN_KWARGS),
             "block_kwargs": {"normalization": "batch", "reversible": True}},
            dense_twin=f"pde-{scheme}-dense"))
    configs.append(ModelConfig(
        "pde-implicit-lean", PDEResNet,
        f"{stage}, no batch norm in the layers: backward Euler steps of the symmetric layer, solved by Newton-CG, "
        "gradients by the implicit function theorem; stable for every h",
        {**base, "scheme": "theta", "operator": "lean", "operator_kwargs": dict(LEAN_KWARGS),
         "block_kwargs": {"theta": 1.0, "tol": 1e-4}}))
    configs.append(ModelConfig(
        "pde-diffusion-reaction", PDEResNet,
        f"{stage}: Lie splitting of a pointwise reaction layer and an implicit (FFT, periodic) diffusion "
        "step with depthwise K, stable for every h",
        {**base, "scheme": "diffusion-reaction", "operator": "depthwise", "operator_kwargs": {"boundary": "circular"},
         "block_kwargs": {"normalization": "batch", "diffusion": "implicit"}},
    ))
    return [replace(c, knobs=Knobs(depth="nt")) for c in configs]


def _baselines() -> list[ModelConfig]:
    knobs = Knobs(width_keys=("width_mult",))
    return [
        ModelConfig("mobilenetv2", MobileNetV2, "MobileNetV2, small-image variant (stride-1 stem), width "
                    "multiplier width_mult", {"width_mult": 1.0}, knobs=knobs),
        ModelConfig("shufflenetv2", ShuffleNetV2, "ShuffleNetV2 1x, small-image variant (stride-1 stem, no max "
                    "pooling), width multiplier width_mult", {"width_mult": 1.0}, knobs=knobs),
    ]


def _segmentation() -> list[ModelConfig]:
    from .segmentation.network import SegmentationNet

    base = {"widths": (32, 64, 128, 128), "stem_width": 16, "scheme": "euler", "nt": 1, "h": 1.0,
            "block_kwargs": {"normalization": "batch"}, "decoder_width": 32}
    layout = ("segmentation net (CamVid): full-resolution stem, 4 residual stages 32/64/128/128 at 1/2..1/16 "
              "resolution (forward Euler, batch norm), top-down decoder with lateral 1x1 and 3x3 refinement")
    configs = [
        ModelConfig("dense-segnet", SegmentationNet, f"{layout}, dense 3x3 operators", {**base, "operator": "dense"},
                    task="segmentation"),
        # The 9-point stencil: the cross runs as a 3x3 depthwise kernel anyway (same executed FLOPs), and in
        # 20-epoch CamVid runs (class-weighted) it gave 25.2 mIoU against the cross's 22.6.
        ModelConfig("lean-segnet", SegmentationNet, f"{layout}, lean operators with the full 9-point stencil",
                    {**base, "operator": "lean", "operator_kwargs": {**LEAN_KWARGS, "stencil": "full"}},
                    dense_twin="dense-segnet",
                    task="segmentation"),
    ]
    return [replace(c, knobs=Knobs(width_keys=("widths", "stem_width", "decoder_width"), depth="nt")) for c in configs]


CONFIGS: dict[str, ModelConfig] = {c.name: c for c in _resnets() + _pde_nets() + _baselines() + _segmentation()}
TASKS = ("classification", "segmentation")


def register_config(name: str, builder, description: str, defaults: dict | None = None,
                    dense_twin: str | None = None, task: str = "classification") -> ModelConfig:
    """Add the named configuration ``name``: ``builder(num_classes=..., in_channels=..., **defaults)``.

    ``builder`` is a class or function taking the keywords ``num_classes`` and ``in_channels``; ``defaults`` are
    checked against its other keywords now, not when the model is first built. Returns the
    :class:`ModelConfig`. ``TypeError`` for a wrong type, ``ValueError`` for a name already taken, an unknown
    default, twin or task.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise TypeError(f"a configuration name must be a non-empty string without spaces, got {name!r}")
    if name in CONFIGS:
        raise ValueError(f"a configuration named {name!r} is already registered ({CONFIGS[name].description})")
    if not callable(builder):
        raise TypeError(f"configuration {name!r}: builder must be a class or function, got {type(builder).__name__}")
    if not isinstance(description, str):
        raise TypeError(f"configuration {name!r}: description must be a string, got {type(description).__name__}")
    if defaults is not None and not isinstance(defaults, dict):
        raise TypeError(f"configuration {name!r}: defaults must be a dict, got {type(defaults).__name__}")
    if task not in TASKS:
        raise ValueError(f"configuration {name!r}: unknown task {task!r}; expected one of {TASKS}")
    if dense_twin is not None and dense_twin not in CONFIGS:
        raise ValueError(f"configuration {name!r}: its dense twin {dense_twin!r} is not a registered configuration")
    config = ModelConfig(name, builder, description, dict(defaults or {}), dense_twin, task)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        raise TypeError(f"configuration {name!r}: cannot read the keywords of builder {builder!r}") from None
    missing = [k for k in COMMON_KEYWORDS if k not in params]
    if missing:
        raise TypeError(f"configuration {name!r}: builder {getattr(builder, '__name__', builder)!r} must take the "
                        f"keywords {', '.join(COMMON_KEYWORDS)} (missing: {', '.join(missing)})")
    unknown = sorted(set(config.defaults) - set(config.keywords()))
    if unknown:
        raise ValueError(f"configuration {name!r}: builder takes no option(s) {', '.join(unknown)}; it takes: "
                         f"{', '.join(config.keywords())}")
    CONFIGS[name] = config
    return config


def list_configs() -> list[str]:
    """Names of all configurations, sorted."""
    return sorted(CONFIGS)


def get_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return CONFIGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model configuration {name!r}; known: {', '.join(list_configs())}") from None


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, *, width: float | None = None,
                depth: int | None = None, **overrides) -> nn.Module:
    """Build configuration ``name`` for ``in_channels`` input channels and ``num_classes`` classes.

    ``overrides`` replace the configuration's defaults; a keyword the network does not take raises a
    ``ValueError`` naming it and the keywords it does take. An ``operator`` override without ``operator_kwargs``
    builds the new kind with its own defaults (the configuration's ``operator_kwargs`` are for its own kind).
    ``width`` and ``depth`` (``None``: the configuration's own) scale the family (see :class:`Knobs`,
    ``WIDTH_HELP``, ``DEPTH_HELP``); an override of the keywords they set is an error, as are impossible values
    (``ValueError``) and non-numbers (``TypeError``).
    """
    config = get_config(name)
    allowed = config.keywords()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"configuration {name!r} ({config.builder.__name__}) has no option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(allowed)}"
        )
    defaults = dict(config.defaults)
    if "operator" in overrides and "operator_kwargs" not in overrides and overrides["operator"] != defaults.get(
            "operator"):
        defaults.pop("operator_kwargs", None)
    kwargs = {**defaults, **overrides}
    if width is not None or depth is not None:
        if config.knobs is None:
            raise ValueError(f"configuration {name!r} has no width or depth knob (a registered configuration "
                             f"without Knobs); set its options with overrides: {', '.join(allowed)}")
        kwargs.update(config.knobs.overrides(name, kwargs, overrides, width, depth))
    return config.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def describe(name: str) -> str:
    """A few lines on configuration ``name``: what it is, its builder, its defaults and overridable keywords."""
    config = get_config(name)
    builder = f"{config.builder.__module__}.{config.builder.__name__}"
    lines = [f"{config.name}: {config.description}", f"  builder: {builder}"]
    lines += [f"  {k} = {v!r}" for k, v in config.defaults.items()]
    if config.dense_twin:
        lines.append(f"  dense twin: {config.dense_twin}")
    if config.knobs:
        lines += [f"  {line}" for line in config.knobs.describe()]
    lines.append(f"  overridable: {', '.join(config.keywords())}")
    return "\n".join(lines)


def parse_overrides(items: Sequence[str]) -> dict:
    """``["nt=2", "h=0.5", "operator=grouped", "operator_kwargs={'groups': 4}"]`` -> keywords.

    Values are Python literals when they parse as one, plain strings otherwise.
    """
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            overrides[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[key] = text.strip()
    return overrides
