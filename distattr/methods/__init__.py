"""Attribution methods: a plain registry from name to a runner and its argument dataclass.

Every runner has the signature ``run(request, args) -> list[MethodOutput]``; ``args`` is the method's
frozen argument dataclass, built from the user's keyword arguments (unknown names are an error that
lists the valid ones; a value of the wrong type is an error that names the valid values, see
:mod:`distattr.arguments`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..arguments import check_value, field_hints, parse_text
from .base import MethodOutput, Request
from .captum_methods import deeplift_attribution
from .discretized_ig import DiscretizedIGArgs, cached_builder
from .gradient import LayerTarget, Path, gradient_attribution
from .internals import attention_attribution
from .lime import LimeArgs, run_lime
from .perturbation import occlusion_attribution
from .reagent import ReagentArgs, run_reagent
from .value_zeroing import ValueZeroingArgs, value_zeroing_attribution


@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class SaliencyArgs:
    """``abs``: take ``|grad|`` per dimension (Captum's and Inseq's default)."""

    abs: bool = True


QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")  # Captum's
RIEMANN = tuple(q for q in QUADRATURES if q.startswith("riemann_"))  # need n_steps >= 2 (Captum asserts it)


def check_path_args(n_steps: int, method: str, internal_batch_size: int | None) -> None:
    """The integrated-gradients family's checks: a known quadrature, enough points for it, a positive batch."""
    if method not in QUADRATURES:
        raise ValueError(f"Unknown integration method {method!r}; use one of {', '.join(QUADRATURES)}")
    if method in RIEMANN and n_steps < 2:
        raise ValueError(f"n_steps must be at least 2 for method={method} (the Riemann rules need two points; "
                         f"gausslegendre works with 1), not {n_steps}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, not {n_steps!r}")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be a positive integer (or None: the token budget decides), "
                         f"not {internal_batch_size!r}")


@dataclass(frozen=True)
class IntegratedGradientsArgs:
    """``n_steps`` path points; ``method``: Captum quadrature (``gausslegendre``, ``riemann_left``,
    ``riemann_right``, ``riemann_middle``, ``riemann_trapezoid``; the Riemann rules need ``n_steps >= 2``);
    ``internal_batch_size``: most path rows per batch (None: the token budget decides);
    ``return_convergence_delta``: completeness error per step."""

    n_steps: int = 50
    method: str = "gausslegendre"
    internal_batch_size: int | None = None
    return_convergence_delta: bool = True

    def __post_init__(self):
        check_path_args(self.n_steps, self.method, self.internal_batch_size)


@dataclass(frozen=True)
class SequentialIntegratedGradientsArgs:
    """``n_steps`` path points per token; ``method``: Captum quadrature (the Riemann rules need ``n_steps >= 2``);
    ``internal_batch_size``: most path rows per batch (None: the token budget decides)."""

    n_steps: int = 50
    method: str = "gausslegendre"
    internal_batch_size: int | None = None

    def __post_init__(self):
        check_path_args(self.n_steps, self.method, self.internal_batch_size)


@dataclass(frozen=True)
class GradientShapArgs:
    """``n_samples`` random points per step, Gaussian input noise ``stdevs``, ``seed`` for reproducibility."""

    n_samples: int = 5
    stdevs: float = 0.0
    seed: int = 42

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, not {self.n_samples!r}")
        if self.stdevs < 0:
            raise ValueError(f"stdevs must be >= 0, not {self.stdevs}")


@dataclass(frozen=True)
class LayerArgs:
    """``target_layer``: module name(s) as in ``model.named_modules()`` (default: the input embeddings).
    Several names (a list, or a comma-separated string) are allowed for layer_gradient_x_activation."""

    target_layer: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class LayerIntegratedGradientsArgs(IntegratedGradientsArgs):
    target_layer: str | None = None


@dataclass(frozen=True)
class OcclusionArgs:
    """``absolute``: report ``|f(x) - f(x occluded)|`` as Inseq does (False keeps the sign)."""

    absolute: bool = True


@dataclass(frozen=True)
class Method:
    run: Callable[[Request, object], list[MethodOutput]]
    args: type
    kind: str  # "gradient", "layer", "internals", "perturbation"
    summary: str


def _ig_path(args: IntegratedGradientsArgs) -> Path:
    from captum.attr._utils.approximation_methods import approximation_parameters

    try:
        step_sizes, alphas = approximation_parameters(args.method)
    except (ValueError, AssertionError) as err:
        raise ValueError(f"Unknown integration method {args.method!r}: {err}") from None
    return Path(alphas=torch.tensor(alphas(args.n_steps), dtype=torch.float64).float(),
                weights=torch.tensor(step_sizes(args.n_steps), dtype=torch.float64).float(), multiply="delta")


def _budget(req: Request, internal_batch_size: int | None) -> Request:
    if internal_batch_size is None:
        return req
    if internal_batch_size < 1:
        raise ValueError("internal_batch_size must be at least 1")
    longest = max(len(ex.target_ids) + (len(ex.source_ids) if ex.source_ids is not None else 0)
                  for ex in req.examples)
    return dataclasses.replace(req, token_budget=min(req.token_budget, internal_batch_size * longest))


def _at_input(multiply: str, absolute: bool = False) -> Path:
    """The one-point path at the input itself (alpha = 1, weight 1)."""
    return Path(torch.ones(1), torch.ones(1), multiply=multiply, absolute=absolute)


def run_saliency(req: Request, args: SaliencyArgs) -> list[MethodOutput]:
    return gradient_attribution(req, _at_input("none", absolute=args.abs))


def run_input_x_gradient(req: Request, args: NoArgs) -> list[MethodOutput]:
    return gradient_attribution(req, _at_input("input"))


def run_integrated_gradients(req: Request, args: IntegratedGradientsArgs) -> list[MethodOutput]:
    return gradient_attribution(_budget(req, args.internal_batch_size), _ig_path(args),
                                convergence_delta=args.return_convergence_delta)


def run_sequential_integrated_gradients(req: Request, args: SequentialIntegratedGradientsArgs) -> list[MethodOutput]:
    path = dataclasses.replace(_ig_path(args), per_position=True)
    return gradient_attribution(_budget(req, args.internal_batch_size), path)


def run_discretized_integrated_gradients(req: Request, args: DiscretizedIGArgs) -> list[MethodOutput]:
    adapter = req.adapter
    builder = cached_builder(adapter.embedding.weight, adapter.embed_scale, set(req.special_ids), args)
    path = Path(alphas=torch.zeros(args.n_steps), weights=torch.ones(args.n_steps), multiply="step",
                points=lambda ids, baseline: builder.points(ids.cpu(), baseline.cpu()))
    return gradient_attribution(req, path)


def run_gradient_shap(req: Request, args: GradientShapArgs) -> list[MethodOutput]:
    if args.n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    generator = torch.Generator().manual_seed(args.seed)
    path = Path(alphas=torch.zeros(args.n_samples), weights=torch.full((args.n_samples,), 1.0 / args.n_samples),
                multiply="delta", noise_std=args.stdevs, random_alphas=True, generator=generator)
    return gradient_attribution(req, path)


def run_deeplift(req: Request, args: NoArgs) -> list[MethodOutput]:
    return deeplift_attribution(req)


def resolve_layers(adapter, target_layer, single: bool) -> LayerTarget:
    """Find modules by name; the default is the input embedding layer."""
    model = adapter.model
    modules = dict(model.named_modules())
    if target_layer is None:
        names = (next(n for n, m in modules.items() if m is model.get_input_embeddings()),)
    elif isinstance(target_layer, str):
        names = tuple(n.strip() for n in target_layer.split(",") if n.strip())
    else:
        names = tuple(target_layer)
    if not names:
        raise ValueError("target_layer is empty")
    if single and len(names) > 1:
        raise ValueError("This method attributes one layer at a time; pass a single target_layer")
    missing = [n for n in names if n not in modules]
    if missing:
        sample = [n for n in modules if n][:12]
        raise ValueError(f"Unknown layer(s) {missing}. Module names look like: {', '.join(sample)} ...")
    encoder = set(map(id, model.get_encoder().modules())) if adapter.is_encoder_decoder else set()
    sides = tuple("source" if id(modules[n]) in encoder else "target" for n in names)
    return LayerTarget(modules=tuple(modules[n] for n in names), sides=sides, names=names)


def run_layer_gradient_x_activation(req: Request, args: LayerArgs) -> list[MethodOutput]:
    layer = resolve_layers(req.adapter, args.target_layer, single=False)
    return gradient_attribution(req, _at_input("input"), layer=layer)


def run_layer_integrated_gradients(req: Request, args: LayerIntegratedGradientsArgs) -> list[MethodOutput]:
    layer = dataclasses.replace(resolve_layers(req.adapter, args.target_layer, single=True), interpolate=True)
    return gradient_attribution(_budget(req, args.internal_batch_size), _ig_path(args), layer=layer,
                                convergence_delta=args.return_convergence_delta)


def run_layer_deeplift(req: Request, args: LayerArgs) -> list[MethodOutput]:
    return deeplift_attribution(req, layer=resolve_layers(req.adapter, args.target_layer, single=True))


def run_occlusion(req: Request, args: OcclusionArgs) -> list[MethodOutput]:
    return occlusion_attribution(req, absolute=args.absolute)


def run_attention(req: Request, args: NoArgs) -> list[MethodOutput]:
    return attention_attribution(req)


METHODS: dict[str, Method] = {
    "saliency": Method(run_saliency, SaliencyArgs, "gradient", "|df/dx| (Simonyan et al. 2013)"),
    "input_x_gradient": Method(run_input_x_gradient, NoArgs, "gradient", "x * df/dx"),
    "integrated_gradients": Method(run_integrated_gradients, IntegratedGradientsArgs, "gradient",
                                   "path integral of gradients from the UNK baseline (Sundararajan et al. 2017)"),
    "sequential_integrated_gradients": Method(
        run_sequential_integrated_gradients, SequentialIntegratedGradientsArgs, "gradient",
        "integrated gradients with one path per token, the others kept at the input (Enguehard 2023)"),
    "discretized_integrated_gradients": Method(
        run_discretized_integrated_gradients, DiscretizedIGArgs, "gradient",
        "IG along monotonic paths through word embeddings (Sanyal & Ren 2021)"),
    "deeplift": Method(run_deeplift, NoArgs, "gradient", "DeepLIFT rescale rule via Captum (Shrikumar et al. 2017)"),
    "gradient_shap": Method(run_gradient_shap, GradientShapArgs, "gradient",
                            "expected gradients at random path points (Lundberg & Lee 2017)"),
    "layer_integrated_gradients": Method(run_layer_integrated_gradients, LayerIntegratedGradientsArgs, "layer",
                                         "integrated gradients over a layer's output"),
    "layer_gradient_x_activation": Method(run_layer_gradient_x_activation, LayerArgs, "layer",
                                          "layer output * gradient (one or many layers in one pass)"),
    "layer_deeplift": Method(run_layer_deeplift, LayerArgs, "layer", "DeepLIFT at a layer's output via Captum"),
    "attention": Method(run_attention, NoArgs, "internals", "attention weights of every layer and head"),
    "occlusion": Method(run_occlusion, OcclusionArgs, "perturbation",
                        "|f(x) - f(x with one token replaced by its baseline)| (Zeiler & Fergus 2014)"),
    "value_zeroing": Method(value_zeroing_attribution, ValueZeroingArgs, "internals",
                            "1 - cos of each layer's output with a token's values zeroed (Mohebbi et al. 2023)"),
    "lime": Method(run_lime, LimeArgs, "perturbation",
                   "kernel-weighted ridge on random token masks, one surrogate per step (Ribeiro et al. 2016)"),
    "reagent": Method(run_reagent, ReagentArgs, "perturbation",
                      "recursive random token replacement until the top tokens keep the prediction (Zhao & Shan 2024)"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown attribution method {name!r}. Available: {', '.join(sorted(METHODS))}") from None


def _check_names(method: str, spec: Method, names) -> None:
    fields = {f.name for f in dataclasses.fields(spec.args)}
    unknown = sorted(set(names) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"Unknown argument(s) {unknown} for method {method!r}. Valid arguments: {valid}")


def build_args(method: str, kwargs: dict) -> object:
    """Validate ``kwargs`` against the method's argument dataclass: known names, values of the fields' types
    (``abs="no"`` is an error, not True; see :func:`distattr.arguments.check_value`), then the dataclass's own
    range checks. Returns the dataclass instance."""
    spec = get_method(method)
    _check_names(method, spec, kwargs)
    hints = field_hints(spec.args)
    for name, value in kwargs.items():
        check_value(f"{method} argument {name}", value, hints.get(name))
    return spec.args(**kwargs)


def parse_args(method: str, texts: dict[str, str]) -> dict:
    """Command-line ``{name: text}`` -> ``{name: value}`` read against the method's field types (``abs=no`` ->
    False, ``n_steps=8`` -> 8, ``internal_batch_size=none`` -> None), checked as :func:`build_args` does."""
    spec = get_method(method)
    _check_names(method, spec, texts)
    hints = field_hints(spec.args)
    kwargs = {name: parse_text(f"{method} argument {name}", text, hints.get(name)) for name, text in texts.items()}
    build_args(method, kwargs)
    return kwargs


def list_methods() -> list[str]:
    return sorted(METHODS)
