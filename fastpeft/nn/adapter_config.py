"""Configuration of bottleneck adapters placed in a model: AdapterHub's ``BnConfig`` fields and presets.

``BnConfig`` carries the same field names, defaults and meaning as AdapterHub
``adapters`` 1.3's ``BnConfig``, so a config saved there
(``adapter_config.json``'s ``"config"``) loads here unchanged and the other way
round (``fastpeft.integrations.adapterhub``). Placement fields
(where the adapter sits and what it wraps): ``mh_adapter`` (after the attention
sub-layer), ``output_adapter`` (after the feed-forward sub-layer),
``original_ln_before`` / ``original_ln_after`` (the block's own residual and
LayerNorm before / after the adapter), ``residual_before_ln`` (True, False or
``"post_add"``: where the adapter's residual is taken), ``is_parallel`` (the
adapter reads the sub-layer's input instead of its output), ``leave_out``
(layer indices without adapters). Module fields (``reduction_factor``,
``non_linearity``, ``ln_before``, ``ln_after``, ``init_weights``, ``scaling``,
``use_gating``, ``adapter_residual_before_ln``, ``dropout``) configure each
``BottleneckAdapter``.

Fields AdapterHub has but fastpeft does not implement (PHM layers, invertible
adapters, cross-attention adapters, stochastic depth, a per-module init seed)
are accepted only at their "off" value; anything else raises ValueError naming
the field, as does an unknown field.

Presets (``ADAPTER_PRESETS``): ``seq_bn`` (Pfeiffer et al. 2020),
``double_seq_bn`` (Houlsby et al. 2019), ``par_bn`` (He et al. 2021, parallel)
and ``scaled_par_bn`` (parallel with a learned scalar scaling); AdapterHub's
older names ``pfeiffer``, ``houlsby``, ``parallel``, ``scaled_parallel`` too.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Union

from .._validation import check_probability
from ..activations import activation as lookup_activation

INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")
SCALING_MODES = ("learned", "channel")

# AdapterHub fields fastpeft accepts only at this value (the feature they switch on is not implemented).
UNSUPPORTED_UNLESS = {
    "inv_adapter": None, "inv_adapter_reduction_factor": None, "cross_adapter": False, "phm_layer": False,
    "stochastic_depth": 0.0, "init_weights_seed": None,
}


@dataclass
class BnConfig:
    """A bottleneck adapter's configuration; field names, defaults and meaning as AdapterHub's ``BnConfig``."""

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: Union[float, Mapping]
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: Any = None
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    use_gating: bool = False
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    inv_adapter: Any = None
    inv_adapter_reduction_factor: Any = None
    cross_adapter: bool = False
    leave_out: list = field(default_factory=list)
    dropout: float = 0.0
    # PHM (Compacter) fields: kept so AdapterHub configs round-trip; only phm_layer=False is supported.
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: Any = True
    shared_W_phm: Any = False
    shared_phm_rule: Any = True
    factorized_phm_rule: Any = False
    phm_c_init: Any = "normal"
    phm_init_range: Any = 0.0001
    learn_phm: Any = True
    hypercomplex_nonlinearity: Any = "glorot-uniform"
    phm_rank: Any = 1
    phm_bias: Any = True
    stochastic_depth: Any = 0.0

    def __post_init__(self):
        validate_bn_config(self)

    def to_dict(self) -> dict:
        """All fields as a JSON-ready dict (what AdapterHub writes under ``"config"``)."""
        d = dataclasses.asdict(self)
        d["leave_out"] = list(d["leave_out"])
        return d

    def bottleneck_size(self, hidden_size: int, layer_idx: int) -> int:
        """``int(hidden // reduction_factor)``, at least 1; a mapping gives per-layer factors (key ``"default"``)."""
        factor = self.reduction_factor
        if isinstance(factor, Mapping):
            factor = factor.get(str(layer_idx), factor.get("default"))
        return max(1, int(hidden_size // factor))


def _preset(**changes) -> dict:
    return changes


ADAPTER_PRESETS: dict[str, dict] = {
    "seq_bn": _preset(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                      adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=False,
                      output_adapter=True, non_linearity="relu", reduction_factor=16),
    "double_seq_bn": _preset(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                             adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=True,
                             output_adapter=True, non_linearity="swish", reduction_factor=16),
    "par_bn": _preset(original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False,
                      mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2,
                      init_weights="mam_adapter", is_parallel=True, scaling=4.0),
}
ADAPTER_PRESETS["scaled_par_bn"] = dict(ADAPTER_PRESETS["par_bn"], scaling="learned")
for _old, _new in (("pfeiffer", "seq_bn"), ("houlsby", "double_seq_bn"), ("parallel", "par_bn"),
                   ("scaled_parallel", "scaled_par_bn")):
    ADAPTER_PRESETS[_old] = ADAPTER_PRESETS[_new]



def resolve_bn_config(config: Union[str, Mapping, BnConfig] = "seq_bn", **overrides) -> BnConfig:
    """A validated ``BnConfig`` from a preset name, a dict (AdapterHub's field names) or a ``BnConfig``.

    ``overrides`` replace fields. A dict may carry AdapterHub's ``"architecture"``
    key (it must be ``"bottleneck"`` or None). Raises ValueError naming an
    unknown preset or field, or a field with a bad or unsupported value.
    """
    if isinstance(config, Mapping):
        config = dict(config)
        architecture = config.pop("architecture", None)
        if architecture not in (None, "bottleneck"):
            raise ValueError(f"config: architecture {architecture!r} is not a bottleneck adapter")
    values = config_values(config, BnConfig, ADAPTER_PRESETS, "adapter", overrides)
    missing = [k for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity") if k not in values]
    if missing:
        raise ValueError(f"config: required adapter config field(s) {missing} not given")
    return BnConfig(**values)


def config_values(config, cls: type, presets: Mapping, what: str, overrides: Mapping) -> dict:
    """The fields of a ``cls`` config given as a preset name, a dict or a ``cls``, ``overrides`` applied.

    ValueError for an unknown preset or field (named, with the known ones),
    TypeError for any other kind of ``config``. Shared by the adapter and
    AdapterFusion configs.
    """
    if isinstance(config, cls):
        values = config.to_dict()
    elif isinstance(config, str):
        if config not in presets:
            raise ValueError(f"config: unknown {what} preset {config!r}; presets: {sorted(presets)}")
        values = dict(presets[config])
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise TypeError(f"config must be a preset name, a dict or a {cls.__name__}, got {type(config).__name__}")
    values.update(overrides)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise ValueError(f"config: unknown {what} config field(s) {unknown}; known fields: {fields}")
    return values


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_factor(value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ValueError(f"reduction_factor must be a positive number (or a mapping of them), got {value!r}")


def validate_bn_config(cfg: BnConfig) -> None:
    """ValueError naming the first field of ``cfg`` with a bad or unsupported value."""
    for name in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "ln_after",
                 "is_parallel", "use_gating", "adapter_residual_before_ln"):
        _check_bool(name, getattr(cfg, name))
    if not (cfg.mh_adapter or cfg.output_adapter):
        raise ValueError("mh_adapter and output_adapter are both False: the adapter would sit nowhere")
    if isinstance(cfg.reduction_factor, Mapping):
        if "default" not in cfg.reduction_factor:
            raise ValueError("reduction_factor: a per-layer mapping needs a 'default' entry, e.g. {'1': 8, 'default': 16}")
        for v in cfg.reduction_factor.values():
            _check_factor(v)
    else:
        _check_factor(cfg.reduction_factor)
    if not isinstance(cfg.non_linearity, str):
        raise ValueError(f"non_linearity must be an activation name, got {cfg.non_linearity!r}")
    try:
        lookup_activation(cfg.non_linearity)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"non_linearity: {exc}") from None
    if cfg.init_weights not in INIT_WEIGHTS:
        raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {cfg.init_weights!r}")
    if isinstance(cfg.scaling, bool) or not (isinstance(cfg.scaling, Real) or cfg.scaling in SCALING_MODES):
        raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {cfg.scaling!r}")
    if not (isinstance(cfg.residual_before_ln, bool) or cfg.residual_before_ln == "post_add"):
        raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {cfg.residual_before_ln!r}")
    check_probability("dropout", cfg.dropout)
    if isinstance(cfg.leave_out, (str, bytes)) or not hasattr(cfg.leave_out, "__iter__"):
        raise ValueError(f"leave_out must be a list of layer indices, got {cfg.leave_out!r}")
    for i in cfg.leave_out:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"leave_out must hold non-negative layer indices, got {i!r}")
    for name, off in UNSUPPORTED_UNLESS.items():
        if getattr(cfg, name) != off:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not supported by fastpeft (only {off!r})")
