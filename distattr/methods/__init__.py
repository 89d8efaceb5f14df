"""Attribution methods: a plain registry from name to everything about a method (:class:`Method`).

Every runner has the signature ``run(request, args) -> list[MethodOutput]``; ``args`` is the method's
frozen argument dataclass, built from the user's keyword arguments (unknown names are an error that
lists the valid ones; a value of the wrong type is an error that names the valid values, see
:mod:`distattr.arguments`). The entry also carries the method's cost model (``cost``, read by the planner)
and what it needs that a remote (Petals) model cannot give (``remote``, read by :func:`check_remote`).

User methods: :func:`register_method` adds one; :func:`load_plugins` imports modules that do so; a name not
in :data:`METHODS` is looked up in the ``distattr.methods`` entry-point group before it is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..arguments import check_value, field_hints, parse_text
from .atp import AtPStarArgs, atp_star, attribution_patching
from .base import MethodOutput, Request
from .captum_methods import deeplift_attribution
from .discretized_ig import DiscretizedIGArgs, cached_builder
from .gradient import LayerTarget, Path, gradient_attribution
from .internals import attention_attribution
from .lime import LimeArgs, run_lime
from .patching import PatchingArgs, activation_patching
from .perturbation import occlusion_attribution
from .reagent import ReagentArgs, run_reagent
from .rows import RowModel, Unit, n_samples_rows, n_steps_rows, one_row
from .value_zeroing import ValueZeroingArgs, value_zeroing_attribution

# a method-argument field that changes speed or memory, not the numbers: kept out of dataset stores' identity (see
# distattr.options), so a resumed job may change it
SPEED_ONLY = {"speed_only": True}


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
    internal_batch_size: int | None = field(default=None, metadata=SPEED_ONLY)
    return_convergence_delta: bool = True

    def __post_init__(self):
        check_path_args(self.n_steps, self.method, self.internal_batch_size)


@dataclass(frozen=True)
class SequentialIntegratedGradientsArgs:
    """``n_steps`` path points per token; ``method``: Captum quadrature (the Riemann rules need ``n_steps >= 2``);
    ``internal_batch_size``: most path rows per batch (None: the token budget decides)."""

    n_steps: int = 50
    method: str = "gausslegendre"
    internal_batch_size: int | None = field(default=None, metadata=SPEED_ONLY)

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


RemoteCheck = Callable[[str, dict], "str | None"]


@dataclass(frozen=True)
class Method:
    """Everything about one attribution method.

    ``run(request, args) -> list[MethodOutput]``: the runner. ``args``: its frozen argument dataclass.
    ``kind``: ``"gradient"``, ``"layer"``, ``"internals"``, ``"perturbation"``, ``"patching"`` (``"custom"`` for user
    methods that do not say), shown by ``distattr methods``. ``summary``: one line.
    ``cost``: the planner's row model (:class:`~distattr.methods.rows.RowModel`); None = not planned
    (:func:`distattr.planner.plan` refuses the method in one line).
    ``remote(name, args) -> str | None``: why the method cannot run, with these user arguments (a dict),
    on a model whose transformer blocks run on remote Petals servers (one line), or None when it can;
    ``remote=None``: no needs beyond gradients at the embeddings and the model's outputs.
    """

    run: Callable[[Request, object], list[MethodOutput]]
    args: type
    kind: str
    summary: str
    cost: RowModel | None = None
    remote: RemoteCheck | None = None


def needs_block_internals(name: str, args: dict) -> str:
    """``remote`` of the internals methods: they read inside the blocks, which a remote model does not give."""
    return (f"{name!r} reads attention weights or activations inside the transformer blocks, which run on remote "
            "Petals servers; use a gradient or perturbation method with a petals:// model")


def layers_outside_remote_blocks(name: str, args: dict) -> str | None:
    """``remote`` of the layer methods: ``target_layer`` must not name a module inside the decoder blocks
    (``...layers.N...``), which run on remote servers; the embeddings and the final norm are local."""
    target = args.get("target_layer")
    targets = [target] if isinstance(target, str) else list(target or ())
    names = [n.strip() for item in targets for n in item.split(",")]
    inside = [n for n in names if ".layers." in f".{n}."]
    if inside:
        return (f"target_layer {inside} is inside the remote Petals blocks; with a petals:// model a layer "
                "method can target the embeddings (the default) or the final norm")
    return None


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
    """Find modules by name; the default is the input embedding layer (for encoder-decoder models the encoder's,
    which transformers 5 keeps as a module of its own, its weight tied to ``shared``, for T5 and BART)."""
    model = adapter.model
    modules = dict(model.named_modules())
    if target_layer is None:
        embedding = (model.get_encoder() if adapter.is_encoder_decoder else model).get_input_embeddings()
        names = (next(n for n, m in modules.items() if m is embedding),)
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


def sequential_rows(args: SequentialIntegratedGradientsArgs, unit: Unit) -> int:
    """Sequential IG's ``points``: a path of ``n_steps`` per prefix token."""
    return args.n_steps * unit.length


def occlusion_rows(args: OcclusionArgs, unit: Unit) -> int:
    """Occlusion's ``points``: the clean row and one row per token that can change an attributed step."""
    return unit.length + 1


def patching_rows(args: PatchingArgs, unit: Unit) -> int:
    """Activation patching's ``points`` per decoder layer (``RowModel.per_layer``): one row per noise draw (one for a
    contrast) and position; each row runs from its layer and position on, about a quarter of a full row's work on
    average (half the layers, half the positions), which the row model does not discount."""
    return (1 if args.corruption == "contrast" else args.noise_samples) * unit.length


def atp_rows(args: PatchingArgs, unit: Unit) -> int:
    """Attribution patching's ``points``: the corrupted rows (noise draws, or one contrast) with a backward per step,
    plus the clean row (forward only, counted as a row). AtP* with ``grad_drop`` runs one backward per step and
    layer, which the row model does not count."""
    return (1 if args.corruption == "contrast" else args.noise_samples) + 1


GRADIENT = RowModel(True, one_row, recomputes=True)
PATH = RowModel(True, n_steps_rows, recomputes=True)
DEEPLIFT = RowModel(True, one_row, steps_per_row=1, copies=2)

# cost=None (attention, value_zeroing, reagent): not planned; their memory (attention maps, per-layer zeroed
# passes, data-dependent rounds) is not the row model's.
METHODS: dict[str, Method] = {
    "saliency": Method(run_saliency, SaliencyArgs, "gradient", "|df/dx| (Simonyan et al. 2013)", GRADIENT),
    "input_x_gradient": Method(run_input_x_gradient, NoArgs, "gradient", "x * df/dx", GRADIENT),
    "integrated_gradients": Method(run_integrated_gradients, IntegratedGradientsArgs, "gradient",
                                   "path integral of gradients from the UNK baseline (Sundararajan et al. 2017)",
                                   PATH),
    "sequential_integrated_gradients": Method(
        run_sequential_integrated_gradients, SequentialIntegratedGradientsArgs, "gradient",
        "integrated gradients with one path per token, the others kept at the input (Enguehard 2023)",
        RowModel(True, sequential_rows)),  # its rows continue a cached prefix: not recomputed
    "discretized_integrated_gradients": Method(
        run_discretized_integrated_gradients, DiscretizedIGArgs, "gradient",
        "IG along monotonic paths through word embeddings (Sanyal & Ren 2021)", PATH),
    "deeplift": Method(run_deeplift, NoArgs, "gradient", "DeepLIFT rescale rule via Captum (Shrikumar et al. 2017)",
                       DEEPLIFT),
    "gradient_shap": Method(run_gradient_shap, GradientShapArgs, "gradient",
                            "expected gradients at random path points (Lundberg & Lee 2017)",
                            RowModel(True, n_samples_rows, recomputes=True)),
    "layer_integrated_gradients": Method(run_layer_integrated_gradients, LayerIntegratedGradientsArgs, "layer",
                                         "integrated gradients over a layer's output", PATH,
                                         layers_outside_remote_blocks),
    "layer_gradient_x_activation": Method(run_layer_gradient_x_activation, LayerArgs, "layer",
                                          "layer output * gradient (one or many layers in one pass)", GRADIENT,
                                          layers_outside_remote_blocks),
    "layer_deeplift": Method(run_layer_deeplift, LayerArgs, "layer", "DeepLIFT at a layer's output via Captum",
                             DEEPLIFT, layers_outside_remote_blocks),
    "attention": Method(run_attention, NoArgs, "internals", "attention weights of every layer and head",
                        None, needs_block_internals),
    "occlusion": Method(run_occlusion, OcclusionArgs, "perturbation",
                        "|f(x) - f(x with one token replaced by its baseline)| (Zeiler & Fergus 2014)",
                        RowModel(False, occlusion_rows, whole_sequence=True)),
    "value_zeroing": Method(value_zeroing_attribution, ValueZeroingArgs, "internals",
                            "1 - cos of each layer's output with a token's values zeroed (Mohebbi et al. 2023)",
                            None, needs_block_internals),
    "lime": Method(run_lime, LimeArgs, "perturbation",
                   "kernel-weighted ridge on random token masks, one surrogate per step (Ribeiro et al. 2016)",
                   RowModel(False, n_samples_rows, whole_sequence=True)),
    "activation_patching": Method(
        activation_patching, PatchingArgs, "patching",
        "restore a component's clean output at each (layer, position) into a corrupted run: indirect effects, "
        "ROME's causal tracing (Meng et al. 2022)",
        RowModel(False, patching_rows, whole_sequence=True, per_layer=True), needs_block_internals),
    "attribution_patching": Method(
        attribution_patching, PatchingArgs, "patching",
        "(clean - corrupted activation) . gradient at the corrupted run, every (layer, position) at once (Nanda 2023)",
        RowModel(True, atp_rows), needs_block_internals),
    "atp_star": Method(
        atp_star, AtPStarArgs, "patching",
        "attribution patching with the QK fix and GradDrop (Kramár et al. 2024)", RowModel(True, atp_rows),
        needs_block_internals),
    "reagent": Method(run_reagent, ReagentArgs, "perturbation",
                      "recursive random token replacement until the top tokens keep the prediction (Zhao & Shan 2024)"),
}
BUILTIN_METHODS = frozenset(METHODS)
ENTRY_POINT_GROUP = "distattr.methods"


def _from_entry_point(name: str) -> Method | None:
    """Load the ``distattr.methods`` entry point called ``name`` (its module calls :func:`register_method` when
    imported); None when no installed package declares one."""
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        return None
    try:
        found[0].load()
    except Exception as err:
        raise ValueError(f"Cannot load method {name!r} from entry point {found[0].value!r} "
                         f"({ENTRY_POINT_GROUP}): {type(err).__name__}: {_first(err)}") from None
    if name not in METHODS:
        raise ValueError(f"Entry point {found[0].value!r} ({ENTRY_POINT_GROUP}) was loaded but did not register "
                         f"method {name!r} (its module should call distattr.register_method({name!r}, ...))")
    return METHODS[name]


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def find_method(name: str) -> Method | None:
    """The entry of ``name``: the registry, else an installed ``distattr.methods`` entry point; None if neither."""
    return METHODS.get(name) or _from_entry_point(name)


def get_method(name: str) -> Method:
    spec = find_method(name)
    if spec is None:
        raise ValueError(f"Unknown attribution method {name!r}. Available: {', '.join(sorted(METHODS))}")
    return spec


def check_remote(method: str, args: dict | None = None) -> None:
    """Refuse, with a one-line ValueError, ``method`` with user arguments ``args`` on a model whose transformer
    blocks run on remote Petals servers, when its entry's ``remote`` says it needs what those cannot give."""
    spec = get_method(method)
    reason = spec.remote(method, dict(args or {})) if spec.remote is not None else None
    if reason:
        raise ValueError(reason)


def register_method(name: str, run: Callable[[Request, object], list[MethodOutput]], args: type = NoArgs, *,
                    kind: str = "custom", summary: str = "", cost: RowModel | None = None,
                    remote: RemoteCheck | None = None, replace: bool = False) -> Method:
    """Add a user method to :data:`METHODS`; it is then usable everywhere a built-in one is
    (``attribute(..., method=name)``, ``distattr methods``, the planner when ``cost`` is given).

    Args:
        name: a Python identifier, not yet registered (a built-in or earlier one is refused unless ``replace``).
        run: ``run(request, args) -> list[MethodOutput]``, one output per ``request.examples`` item (see
            :class:`~distattr.methods.base.MethodOutput` for the shapes).
        args: the method's frozen argument dataclass (every field with a default); :class:`NoArgs` for none.
        kind, summary: what ``distattr methods`` shows.
        cost: the planner's :class:`~distattr.methods.rows.RowModel` (None: the planner refuses the method).
        remote: ``remote(name, args) -> str | None``, why it cannot run on remote Petals blocks (None: it can).
    Returns:
        the new :class:`Method` entry.
    Raises:
        ValueError: one line, for a taken or invalid name, a ``run`` that is not callable, ``args`` that is not a
            frozen dataclass, a ``cost`` that is not a RowModel or a ``remote`` that is not callable.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A method name must be a Python identifier (letters, digits, _), not {name!r}")
    if name in METHODS and not replace:
        what = "a built-in method" if name in BUILTIN_METHODS else "already registered"
        raise ValueError(f"Method {name!r} is {what}; pass replace=True to replace it")
    if not callable(run):
        raise ValueError(f"run of method {name!r} must be callable as run(request, args), not {type(run).__name__}")
    if not (isinstance(args, type) and dataclasses.is_dataclass(args) and args.__dataclass_params__.frozen):
        raise ValueError(f"args of method {name!r} must be a frozen dataclass (@dataclass(frozen=True)), "
                         f"not {getattr(args, '__name__', args)!r}")
    if cost is not None and not isinstance(cost, RowModel):
        raise ValueError(f"cost of method {name!r} must be a distattr.methods.rows.RowModel or None, "
                         f"not {type(cost).__name__}")
    if remote is not None and not callable(remote):
        raise ValueError(f"remote of method {name!r} must be callable as remote(name, args) or None")
    spec = Method(run, args, kind, summary, cost, remote)
    METHODS[name] = spec
    return spec


def load_plugins(modules: Sequence[str]) -> None:
    """Import each module named in ``modules`` (``"pkg.my_methods"``); a plugin module registers its methods with
    :func:`register_method` when imported. A module already imported is not run again.

    Raises:
        ValueError: one line naming the module that cannot be imported, and why.
    """
    if isinstance(modules, str):
        modules = [modules]
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ValueError(f"Cannot import plugin module {module!r}: {type(err).__name__}: {_first(err)}") from None


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
