"""Which quant type each linear gets: --type, --mix GLOB=TYPE (first match wins), --keep-float GLOB."""

from __future__ import annotations

from fnmatch import fnmatchcase

from slimquant.format.architectures import ArchSpec, layer_prefix
from slimquant.format.schemes import FLOAT, W8A8, W8A16, parse_scheme

HEAD_LINEARS = ("lm_head",)  # always float: the quantizer does not calibrate the head
ROUTED_EXPERTS = "*.mlp.experts.*"  # no loader runs them static or W8A16: vLLM-Ascend's fused MoE has neither


def parse_mix(items: list[str] | dict[str, str] | None) -> list[tuple[str, str]]:
    """['*.mlp.*=w8a8_dynamic', '*.mlp.down_proj=w8a16', ...] or {glob: type} -> [(glob, TYPE)], in order."""
    if not items:
        return []
    pairs = list(items.items()) if isinstance(items, dict) else [_split_mix(s) for s in items]
    return [(glob, parse_scheme(t, allow_float=True, allow_weight_only=True)) for glob, t in pairs]


def _split_mix(item: str) -> tuple[str, str]:
    glob, sep, t = item.rpartition("=")
    if not sep or not glob or not t:
        raise ValueError(f"--mix expects GLOB=TYPE, e.g. '*.mlp.*=w8a8_dynamic'; got {item!r}")
    return glob, t


def linear_names(spec: ArchSpec, num_layers: int, config: dict | None = None) -> list[str]:
    """Every decoder-layer linear of the model, full dotted names, in layer order."""
    return [layer_prefix(i) + rel for i in range(num_layers) for rel in spec.layer_linears(config or {}, i)]


def plan_types(
    spec: ArchSpec,
    num_layers: int,
    quant_type: str,
    mix: list[tuple[str, str]],
    keep_float: list[str],
    config: dict | None = None,
    static_all: bool = False,
) -> dict[str, str]:
    """Full linear name -> W8A8 | W8A8_DYNAMIC | W8A16 | FLOAT; ValueError for globs that match nothing.

    For --type w8a8 the user's --mix globs come first, then the architecture's w8a8_mix (format constraints),
    then its w8a8_default_mix (the accuracy recipe, e.g. Llama/Qwen mlp.down_proj dynamic) unless static_all.
    """
    names = linear_names(spec, num_layers, config)
    _check_globs_match(names, [g for g, _ in mix], "--mix", with_head=False)
    _check_globs_match(names, keep_float, "--keep-float", with_head=True)
    floats = list(spec.keep_float) + list(keep_float)
    mix = list(mix) + (list(default_mix(spec, static_all)) if quant_type == W8A8 else [])  # the user's globs win
    plan = {}
    for name in names:
        if any(fnmatchcase(name, g) for g in floats):
            plan[name] = FLOAT
        else:
            plan[name] = next((t for g, t in mix if fnmatchcase(name, g)), quant_type)
    _check_fused(spec, num_layers, plan, config or {})
    _check_expert_types(plan)
    return plan


def _check_expert_types(plan: dict[str, str]) -> None:
    """Routed experts quantized static W8A8 or W8A16 make a checkpoint that no current loader runs: refuse at plan
    time."""
    for qtype in (W8A8, W8A16):
        bad = [name for name, t in plan.items() if t == qtype and fnmatchcase(name, ROUTED_EXPERTS)]
        if bad:
            raise ValueError(
                f"{len(bad)} routed expert linears would be {qtype} (e.g. {bad[0]}), which no current loader runs "
                "(vLLM-Ascend's fused MoE has no static W8A8 or W8A16 method, and slimquant's neither): make them "
                f"w8a8_dynamic, e.g. --mix '{ROUTED_EXPERTS}=w8a8_dynamic' first, or keep them float"
            )


def default_mix(spec: ArchSpec, static_all: bool = False) -> tuple[tuple[str, str], ...]:
    """The (glob, TYPE) pairs that --type w8a8 adds after the user's --mix: all of them, or static_all's."""
    return spec.w8a8_mix + (() if static_all else spec.w8a8_default_mix)


def recipe_note(spec: ArchSpec, quant_type: str, static_all: bool, plan: dict[str, str]) -> str:
    """What the default w8a8 recipe made dynamic, e.g. '*.mlp.down_proj=W8A8_DYNAMIC (30 linears)', or '' (also
    where the user's globs took every linear it would have)."""
    if quant_type != W8A8 or static_all or not spec.w8a8_default_mix:
        return ""
    parts = []
    for glob, t in spec.w8a8_default_mix:
        n = sum(fnmatchcase(name, glob) and got == t for name, got in plan.items())
        parts += [f"{glob}={t} ({n} linears)"] if n else []  # none: the user's --mix / --keep-float took them all
    return ", ".join(parts)


def _check_globs_match(names: list[str], globs: list[str], option: str, with_head: bool) -> None:
    candidates = names + list(HEAD_LINEARS) if with_head else names
    for g in globs:
        if not any(fnmatchcase(n, g) for n in candidates):
            if any(fnmatchcase(n, g) for n in HEAD_LINEARS):
                raise ValueError(f"{option} {g!r} matches only {HEAD_LINEARS[0]}, which always stays float")
            raise ValueError(
                f"{option} {g!r} matches no linear of this model; globs match full names such as "
                f"{names[0]!r} (use e.g. '*.mlp.down_proj' or 'model.layers.0.*')"
            )


def _check_fused(spec: ArchSpec, num_layers: int, plan: dict[str, str], config: dict) -> None:
    """Fused linears (q/k/v, gate/up, routed experts) are one layer at runtime: they must share one type."""
    for i in range(num_layers):
        for group in spec.layer_fused(spec.layer_linears(config, i), with_same_type=True):
            names = [layer_prefix(i) + rel for rel in group]
            types = {plan[n] for n in names}
            if len(types) > 1:
                got = _describe_group(names, plan, layer_prefix(i))
                raise ValueError(
                    f"layer {i}: fused linears must share one quant type, got {got}; "
                    "give --mix/--keep-float globs that cover the whole group (e.g. '*.self_attn.[qkv]_proj')"
                )


def _describe_group(names: list[str], plan: dict[str, str], prefix: str) -> str:
    """'q_proj=FLOAT, k_proj=W8A8, ...'; a big group (routed experts): one example linear per type."""
    if len(names) <= 4:
        return ", ".join(f"{n.rsplit('.', 1)[-1]}={plan[n]}" for n in names)
    examples = {plan[n]: n[len(prefix) :] for n in reversed(names)}  # the first linear of each type
    return ", ".join(f"{n}={t}" for t, n in sorted(examples.items()))
