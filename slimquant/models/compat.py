"""Who can load an ascend checkpoint folder, and why not: the report behind `slimquant inspect`.

Two loaders are checked. slimquant's: the same AscendQuantConfig the engine builds its layers with, and the
format's tensor lists (format.schemes.SCHEME_TENSORS). vLLM-Ascend's: its rules are written down here from its code
(vllm_ascend/quantization at 182b75ea; docs/FORMAT.md): what it refuses with an error, and what it loads but then
runs wrong, which is worse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimquant.format.architectures import ArchSpec, arch_spec, config_value, is_moe_layer, layer_index, layer_prefix
from slimquant.format.checkpoint import (
    KV_CACHE_TENSORS,
    kv_cache_int8,
    read_description,
    tensor_types,
    unsupported_features,
)
from slimquant.format.dtypes import canonical_name
from slimquant.format.primitives import decode_deq_scale
from slimquant.format.safetensors_io import SAFETENSORS_DTYPES, SafetensorsFolder
from slimquant.format.schemes import FLOAT, SCHEME_TENSORS, W8A8
from slimquant.format.validation import TensorRule, rule_for

SLIMQUANT, VLLM_ASCEND = "slimquant", "vllm-ascend"
ERROR, WARNING = "error", "warning"
HEAD = "lm_head"

# vLLM-Ascend's registries of quant methods (vllm_ascend/quantization/methods at 182b75ea): a type outside them
# is an error there. It has no static (W8A8) method for MoE experts.
VLLM_LINEAR_TYPES = frozenset(
    {
        "W8A8",
        "W8A8_DYNAMIC",
        "W8A8_MIX",
        "W8A16",
        "W4A4_DYNAMIC",
        "W4A4_FLATQUANT_DYNAMIC",
        "W4A4_MXFP4",
        "W4A4_MXFP4_FLATQUANT",
        "W4A8_MXFP",
        "W8A8_MXFP8",
        "W8A8FP8_DYNAMIC",
    }
)
VLLM_MOE_TYPES = frozenset(
    {"W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16", "W4A16_MXFP4", "W4A4_MXFP4", "W4A8_MXFP", "W8A8_MXFP8", "W8A8FP8_DYNAMIC"}
)
# the dtype vLLM-Ascend's static method registers deq_scale in, by model dtype; it refuses float32 models outright
VLLM_DEQ_SCALE_DTYPE = {"bfloat16": "F32", "float16": "I64"}
EXAMPLES = 3  # names listed per finding


@dataclass
class Finding:
    """One rule a checkpoint breaks for one loader, with what to do about it."""

    loader: str  # SLIMQUANT | VLLM_ASCEND
    level: str  # ERROR: it does not load, or loads and runs wrong; WARNING: it runs, with a caveat
    rule: str  # short id, e.g. "missing-entry"
    message: str
    fix: str
    names: list[str] = field(default_factory=list)  # the tensors or layers concerned (all of them)


@dataclass(frozen=True)
class Group:
    """Linears that the runtimes build as one layer: a fused linear, a single one, or one MoE layer's experts."""

    prefix: str  # e.g. "model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.3.mlp.experts"
    names: tuple[str, ...]
    moe: bool


@dataclass
class LayerGroup:
    """Consecutive decoder layers with the same scheme per linear."""

    first: int
    last: int
    schemes: dict[str, list[str]]  # scheme -> short linear names, e.g. {"W8A8": ["q", "k", "v", "o"]}
    mtp: bool = False  # layers past num_hidden_layers: DeepSeek's multi-token-prediction layers


@dataclass
class Report:
    """What an ascend checkpoint folder is, and which loaders run it."""

    path: str
    layout: str
    model_type: str
    num_layers: int
    dtype: str
    tied_embeddings: bool
    model_quant_type: str | None
    kv_cache: str
    shards: int
    bytes_by_scheme: dict[str, int]
    linears_by_scheme: dict[str, int]
    layers: list[LayerGroup]
    findings: list[Finding]

    def loads(self, loader: str) -> bool:
        """Whether the loader runs it correctly: no error finding for it."""
        return not any(f.loader == loader and f.level == ERROR for f in self.findings)

    def to_dict(self) -> dict:
        """JSON-ready form, with the two verdicts."""
        return asdict(self) | {"loads": {SLIMQUANT: self.loads(SLIMQUANT), VLLM_ASCEND: self.loads(VLLM_ASCEND)}}


def inspect_checkpoint(path: str | Path) -> Report:
    """Read a checkpoint folder's description, config and shard headers (and the few tiny tensors the rules need)."""
    path = Path(path)
    desc = read_description(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: a checkpoint folder needs the model's config next to its shards")
    ckpt = _Checkpoint(path, desc, json.loads(config_file.read_text()), SafetensorsFolder(path))
    return Report(
        path=str(path),
        layout=_layout(path, desc),
        model_type=str(config_value(ckpt.config, "model_type", "?")),
        num_layers=ckpt.num_layers,
        dtype=ckpt.dtype,
        tied_embeddings=ckpt.tied,
        model_quant_type=desc.get("model_quant_type"),
        kv_cache="int8 (C8)" if ckpt.kv_int8 else "float",
        shards=len({ckpt.tensors.info(n).file for n in ckpt.tensors.keys()}),
        bytes_by_scheme=ckpt.bytes_by_scheme(),
        linears_by_scheme=ckpt.linears_by_scheme(),
        layers=ckpt.layer_groups(),
        findings=[f for rule in RULES for f in rule(ckpt)],
    )


class _Checkpoint:
    """The facts the rules read: description types, config, architecture, the linears the models build."""

    def __init__(self, path: Path, desc: dict, config: dict, tensors: SafetensorsFolder):
        self.path, self.desc, self.config, self.tensors = path, desc, config, tensors
        self.types = tensor_types(desc)
        self.spec: ArchSpec = arch_spec(config)
        self.num_layers = int(config_value(config, "num_hidden_layers", 0))
        self.dtype = canonical_name(config_value(config, "torch_dtype") or config_value(config, "dtype")) or "?"
        self.tied = bool(config_value(config, "tie_word_embeddings", False))
        self.kv_int8 = kv_cache_int8(desc)

    def kv_tensors(self) -> list[str]:
        """The int8 KV-cache tensors a C8 checkpoint of this model needs (none for a float cache or MLA)."""
        if not (self.kv_int8 and self.spec.int8_kv_cache):
            return []
        return [f"{layer_prefix(i)}self_attn.{t}" for i in range(self.num_layers) for t in KV_CACHE_TENSORS]

    def layer_linears(self, i: int) -> list[str]:
        """Full names of layer i's linears."""
        return [layer_prefix(i) + r for r in self.spec.layer_linears(self.config, i)]

    def linears(self) -> list[str]:
        """Every linear both runtimes build (the LM head included), full names."""
        return [name for i in range(self.num_layers) for name in self.layer_linears(i)] + [HEAD]

    def groups(self) -> list[Group]:
        """The linears as the runtimes build them: fused groups, single linears, and each layer's routed experts
        as one group (one FusedMoE layer)."""
        out: list[Group] = []
        for i in range(self.num_layers):
            rels = self.spec.layer_linears(self.config, i)
            experts = tuple(r for r in rels if _is_expert(r))
            fused = [g for g in self.spec.layer_fused(rels) if not any(_is_expert(r) for r in g)]
            grouped = {r for g in fused for r in g} | set(experts)
            for g in fused + [(r,) for r in rels if r not in grouped]:
                names = tuple(layer_prefix(i) + r for r in g)
                parent, _, _ = names[0].rpartition(".")
                label = names[0] if len(g) == 1 else parent + "." + "+".join(n.rpartition(".")[2] for n in names)
                out.append(Group(label, names, moe=False))
            if experts:
                out.append(Group(f"{layer_prefix(i)}mlp.experts", tuple(layer_prefix(i) + r for r in experts), True))
        return out + [Group(HEAD, (HEAD,), moe=False)]

    def scheme(self, linear: str) -> str | None:
        """The description's type of a linear (its weight's entry), None where it has none."""
        return self.types.get(f"{linear}.weight")

    def bytes_by_scheme(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.tensors.keys():
            scheme = self.types.get(name, "undescribed")
            out[scheme] = out.get(scheme, 0) + self.tensors.info(name).nbytes
        return out

    def linears_by_scheme(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for linear in self.linears():
            scheme = self.scheme(linear) or "missing"
            out[scheme] = out.get(scheme, 0) + 1
        return out

    def mtp_layers(self) -> list[int]:
        """Indices of the described layers past num_hidden_layers (DeepSeek's MTP layers), in order."""
        return sorted({layer_index(name) for name in self.types} - {None} - set(range(self.num_layers)))

    def layer_groups(self) -> list[LayerGroup]:
        """The decoder layers, then the MTP layers, consecutive ones with the same schemes in one group."""
        groups: list[LayerGroup] = []
        for i in [*range(self.num_layers), *self.mtp_layers()]:
            mtp = i >= self.num_layers
            schemes: dict[str, list[str]] = {}
            for rel in self.spec.layer_linears(self.config, i):
                short = _short_name(rel)
                names = schemes.setdefault(self.scheme(layer_prefix(i) + rel) or "missing", [])
                if short not in names:
                    names.append(short)
            last = groups[-1] if groups else None
            if last and last.schemes == schemes and last.last == i - 1 and last.mtp == mtp:
                last.last = i
            else:
                groups.append(LayerGroup(i, i, schemes, mtp))
        return groups


def _is_expert(rel: str) -> bool:
    return rel.startswith("mlp.experts.")


def _short_name(rel: str) -> str:
    """'self_attn.q_proj' -> 'q', 'mlp.experts.7.down_proj' -> 'experts.*.down', 'mlp.shared_experts.up_proj' ->
    'shared_experts.up'."""
    parts = rel.removeprefix("self_attn.").removeprefix("mlp.").split(".")
    if parts[0] == "experts":
        parts[1] = "*"
    return ".".join(parts).removesuffix("_proj").replace("_proj_", "_")


def _layout(path: Path, desc: dict) -> str:
    """'ModelSlim V1' (current saver) or 'ModelSlim V0' (older saver; slimquant writes this one)."""
    v1_files = any(path.glob("quant_model_weights*.safetensors"))
    keys = list(desc)
    header_last = bool(keys) and keys[-1] in ("optional", "metadata", "group_size", "model_quant_type")
    return "ModelSlim V1" if v1_files or header_last else "ModelSlim V0"


def _finding(loader: str, level: str, rule: str, names: list[str], message: str, fix: str) -> list[Finding]:
    """[] when no names are concerned, else one Finding whose message names a few of them."""
    if not names:
        return []
    shown = ", ".join(names[:EXAMPLES]) + (f" and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else "")
    return [Finding(loader, level, rule, message.format(n=len(names), names=shown), fix, names)]


def _both(level: str, rule: str, names: list[str], message: str, fix: str) -> list[Finding]:
    """The same finding for both loaders."""
    return [f for loader in (SLIMQUANT, VLLM_ASCEND) for f in _finding(loader, level, rule, names, message, fix)]


# ---- the rules: each reads the checkpoint and returns its findings ----


def header_rules(ck: _Checkpoint) -> list[Finding]:
    """Header features slimquant does not run; the older KV-cache key that vLLM-Ascend no longer reads."""
    out = [
        Finding(SLIMQUANT, ERROR, "header", p, "quantize the float model again without it")
        for p in unsupported_features(ck.desc)
    ]
    if ck.desc.get("kv_quant_type") and not ck.desc.get("kv_cache_type"):
        out.append(
            Finding(
                VLLM_ASCEND,
                WARNING,
                "kv-quant-type",
                f"the description says kv_quant_type={ck.desc['kv_quant_type']!r} (the older saver's key); "
                "vLLM-Ascend reads only kv_cache_type, so it runs a float KV cache",
                'add "kv_cache_type": "C8" to quant_model_description.json',
            )
        )
    return out


def dtype_rules(ck: _Checkpoint) -> list[Finding]:
    """vLLM-Ascend's ascend quantization takes bf16 / fp16 models only."""
    if ck.dtype != "float32":
        return []
    return _finding(
        VLLM_ASCEND,
        ERROR,
        "float32-model",
        ["config.json"],
        "config.json's dtype is float32: vLLM-Ascend's ascend quantization runs bfloat16 and float16 models only",
        "save the float model in bfloat16 and quantize that (scales are rounded to the model dtype)",
    )


def entry_rules(ck: _Checkpoint) -> list[Finding]:
    """Every linear the model builds needs its `<linear>.weight` entry; the LM head too, even when tied."""
    missing = [f"{name}.weight" for name in ck.linears() if ck.scheme(name) is None]
    out = _finding(
        VLLM_ASCEND,
        ERROR,
        "missing-entry",
        missing,
        "quant_model_description.json has no entry for {n} linear weights ({names}): vLLM-Ascend raises "
        "KeyError looking them up",
        're-quantize with `slimquant quantize`; for a tied LM head, adding "lm_head.weight": "FLOAT" is enough',
    )
    ours = [m for m in missing if not (ck.tied and m == f"{HEAD}.weight")]
    return out + _finding(
        SLIMQUANT,
        ERROR,
        "missing-entry",
        ours,
        "quant_model_description.json has no entry for {n} linear weights ({names})",
        "re-quantize with `slimquant quantize`, or check that config.json matches the weights (layer count, "
        "experts, tensor-name prefix)",
    )


def type_rules(ck: _Checkpoint) -> list[Finding]:
    """Types vLLM-Ascend has no method for: unknown linear types, static routed experts (slimquant's own loader
    speaks for itself in group_rules)."""
    linears = [name for name in ck.linears() if ck.scheme(name) is not None]
    experts = [n for n in linears if ".mlp.experts." in n]
    out = _finding(
        VLLM_ASCEND,
        ERROR,
        "unsupported-type",
        [
            f"{n}: {ck.scheme(n)}"
            for n in linears
            if n not in experts and ck.scheme(n) not in VLLM_LINEAR_TYPES | {FLOAT}
        ],
        "{n} linears have a type vLLM-Ascend has no method for ({names})",
        "quantize with a type it runs (W8A8 or W8A8_DYNAMIC)",
    )
    return out + _finding(
        VLLM_ASCEND,
        ERROR,
        "moe-type",
        [f"{n}: {ck.scheme(n)}" for n in experts if ck.scheme(n) not in VLLM_MOE_TYPES | {FLOAT}],
        "{n} routed-expert linears have a type vLLM-Ascend's MoE has no method for ({names}); it has no static "
        "(W8A8) MoE",
        "quantize the routed experts W8A8_DYNAMIC (slimquant's default for MoE layers)",
    )


def group_rules(ck: _Checkpoint) -> list[Finding]:
    """Fused layers (q/k/v, gate/up, one MoE layer's experts) need one type that the loader runs; for slimquant,
    its own loader decides, layer by layer as the engine builds them."""
    from slimquant.layers.quant_config import AscendQuantConfig  # the engine's rules, to the letter

    qc = AscendQuantConfig(ck.types)  # tensor entries only: the header is header_rules' job
    ours, theirs = [], []
    for group in ck.groups():
        if any(ck.scheme(n) is None for n in group.names):
            continue  # entry_rules reports it
        try:
            if group.moe:
                qc.moe_quant_type(group.prefix, list(group.names))
            else:
                qc.linear_method(group.prefix, list(group.names))
        except ValueError as e:
            ours.append(str(e))
        if len({ck.scheme(n) for n in group.names}) > 1:
            theirs.append(group.prefix)
    fix = "re-quantize with `slimquant quantize` (W8A8 or W8A8_DYNAMIC; fused shards share one type)"
    out = [Finding(SLIMQUANT, ERROR, "layer-type", m, fix) for m in ours]
    return out + _finding(
        VLLM_ASCEND,
        ERROR,
        "mixed-group",
        theirs,
        "{n} fused layers mix types across their shards ({names}): vLLM-Ascend refuses a layer that is partly "
        "float and runs a mixed one with one shard's type",
        "re-quantize so q/k/v, gate/up (and one layer's experts) share one type (`slimquant quantize` does)",
    )


def tensor_rules(ck: _Checkpoint) -> list[Finding]:
    """Every tensor a linear's scheme needs is in the shards; every described tensor exists."""
    missing = []
    for name in ck.linears():
        scheme = ck.scheme(name)
        if scheme in SCHEME_TENSORS and not (name == HEAD and ck.tied):
            required, _ = SCHEME_TENSORS[scheme]
            missing += [f"{name}.{leaf}" for leaf in required if f"{name}.{leaf}" not in ck.tensors]
    missing += [n for n in ck.kv_tensors() if n not in ck.tensors]
    absent = [
        n for n in ck.types if n not in ck.tensors and n not in missing and not (ck.tied and n == f"{HEAD}.weight")
    ]
    return _both(
        ERROR,
        "missing-tensor",
        missing + absent,
        "{n} tensors the description and the schemes call for are in no shard ({names})",
        "copy every shard and its index; if they are all there, re-quantize",
    )


def value_rules(ck: _Checkpoint) -> list[Finding]:
    """Every tensor of a quantized linear (and of the int8 KV cache) in its stored dtype, and its values usable
    (format.validation, the checks slimquant's loader makes; weights by dtype only): NaN or zero scales run wrong
    anywhere."""
    problems: dict[str, str] = {}
    for name in ck.linears():
        scheme = ck.scheme(name)
        if scheme in SCHEME_TENSORS and scheme != FLOAT:
            for leaf in (*SCHEME_TENSORS[scheme][0], *SCHEME_TENSORS[scheme][1], "bias"):
                _check_value(ck, f"{name}.{leaf}", rule_for(leaf, scheme), problems)
    for name in ck.kv_tensors():
        _check_value(ck, name, rule_for(name.rpartition(".")[2], "C8"), problems)
    if not problems:
        return []
    first = next(iter(problems.values()))
    return _both(
        ERROR,
        "tensor-value",
        list(problems),
        "{n} tensors break the format's dtypes or ranges ({names}); the first: " + first,
        "re-download the checkpoint, or quantize the float model again",
    )


def _check_value(ck: _Checkpoint, name: str, rule: TensorRule | None, problems: dict[str, str]) -> None:
    """Record why the tensor breaks its rule (dtype from the header; values read unless it is a weight)."""
    if rule is None or name not in ck.tensors:
        return  # tensor_rules reports missing ones
    info = ck.tensors.info(name)
    stored = torch.empty(0, dtype=SAFETENSORS_DTYPES[info.dtype])
    try:
        if name.endswith(".weight"):
            rule.check(name, stored)
        else:
            raw = ck.tensors.get(name)
            rule.check(name, raw, decode_deq_scale(raw) if name.endswith(".deq_scale") else raw)
    except ValueError as e:
        problems[name] = str(e)


def bias_rules(ck: _Checkpoint) -> list[Finding]:
    """vLLM-Ascend's models drop the bias of a linear they build without one (a static linear's float bias is
    folded into quant_bias and not read anyway)."""
    dropped = [
        f"{name}.bias"
        for i in range(ck.num_layers)
        for name in ck.layer_linears(i)
        if f"{name}.bias" in ck.types
        and ck.scheme(name) != W8A8
        and not ck.spec.has_bias(ck.config, name.removeprefix(layer_prefix(i)))
    ]
    return _finding(
        VLLM_ASCEND,
        ERROR,
        "dropped-bias",
        dropped,
        "{n} biases sit on linears that vLLM-Ascend's model builds without one ({names}); it drops them "
        "silently and runs wrong (an anti-outlier shift into a dynamic or float linear)",
        "re-quantize with `slimquant quantize` (it refuses this shift) or with --anti-outlier smoothquant",
    )


def float_layer_rules(ck: _Checkpoint) -> list[Finding]:
    """A MoE router (mlp.gate) or Qwen2-MoE's mlp.shared_expert_gate quantized: vLLM builds both float
    (quant_config=None), so an int8 one loads in neither; for slimquant, its own loader's check on each MoE layer
    the engine builds."""
    from slimquant.layers.moe import float_layers
    from slimquant.layers.quant_config import AscendQuantConfig  # the engine's rules, to the letter

    qc, ours = AscendQuantConfig(ck.types), []
    for i in range(ck.num_layers):
        try:
            if is_moe_layer(ck.config, i):
                qc.check_float(float_layers(f"{layer_prefix(i)}mlp"))
        except ValueError as e:
            ours.append(str(e))
    fix = "re-quantize with `slimquant quantize`, which keeps them float"
    gates = tuple(f"{p}.weight" for p in float_layers("mlp"))
    quantized = [f"{n}: {t}" for n, t in ck.types.items() if n.endswith(gates) and t != FLOAT]
    return [Finding(SLIMQUANT, ERROR, "float-layer", m, fix) for m in ours] + _finding(
        VLLM_ASCEND,
        ERROR,
        "float-layer",
        quantized,
        "{n} weights that vLLM builds float (quant_config=None: a MoE router, Qwen2-MoE's shared_expert_gate) are "
        "quantized ({names})",
        fix,
    )


def static_value_rules(ck: _Checkpoint) -> list[Finding]:
    """Static linears' tensors in the forms vLLM-Ascend's parameters take: deq_scale's dtype by model dtype; one
    input quantization per fused layer."""
    want = VLLM_DEQ_SCALE_DTYPE.get(ck.dtype)
    static = [n for n in ck.linears() if ck.scheme(n) == W8A8]
    wrong_deq = [
        f"{n}.deq_scale: {ck.tensors.info(f'{n}.deq_scale').dtype}"
        for n in static
        if want and f"{n}.deq_scale" in ck.tensors and ck.tensors.info(f"{n}.deq_scale").dtype != want
    ]
    out = _finding(
        VLLM_ASCEND,
        ERROR,
        "deq-scale-dtype",
        wrong_deq,
        f"{{n}} deq_scale tensors are not {want} ({{names}}), the form vLLM-Ascend's {ck.dtype} models read: "
        "their values would be misread",
        "re-quantize with `slimquant quantize` from the model in its serving dtype",
    )
    differ = [
        g.prefix
        for g in ck.groups()
        if len(g.names) > 1
        and not g.moe
        and all(ck.scheme(n) == W8A8 for n in g.names)
        and not _same_input_params(ck, g.names)
    ]
    return out + _both(
        WARNING,
        "fused-input-scale",
        differ,
        "{n} fused static layers have shards with different input_scale / input_offset ({names}); the runtime "
        "quantizes their input once, with the last shard's",
        "calibrate fused shards together (`slimquant quantize` does)",
    )


def _same_input_params(ck: _Checkpoint, group: tuple[str, ...]) -> bool:
    seen = set()
    for name in group:
        if f"{name}.input_scale" not in ck.tensors or f"{name}.input_offset" not in ck.tensors:
            return True  # tensor_rules reports it
        seen.add(
            (
                ck.tensors.get(f"{name}.input_scale").float().item(),
                ck.tensors.get(f"{name}.input_offset").float().item(),
            )
        )
    return len(seen) == 1


def kv_cache_rules(ck: _Checkpoint) -> list[Finding]:
    """C8 caches: only for standard attention; vLLM-Ascend reads the cache back with the scales alone."""
    if not ck.kv_int8:
        return []
    if not ck.spec.int8_kv_cache:
        return _finding(
            SLIMQUANT,
            ERROR,
            "kv-cache",
            ["kv_cache_type"],
            "the description asks for an int8 (C8) KV cache, which is for standard attention; this model's MLA "
            "caches one latent vector per token",
            "quantize the float model again without --kv-cache int8",
        )
    nonzero = [n for n in ck.kv_tensors() if n.endswith("offset") and n in ck.tensors and ck.tensors.get(n).any()]
    return _finding(
        VLLM_ASCEND,
        ERROR,
        "kv-cache-offset",
        nonzero,
        "{n} int8 KV-cache offsets are not zero ({names}): vLLM-Ascend adds them when it stores k / v but reads "
        "the cache back with the scales alone, so it runs wrong (slimquant subtracts them)",
        "calibrate symmetric KV-cache scales (`slimquant quantize --kv-cache int8` writes zero offsets)",
    )


RULES = (
    header_rules,
    value_rules,
    dtype_rules,
    entry_rules,
    type_rules,
    group_rules,
    tensor_rules,
    bias_rules,
    float_layer_rules,
    static_value_rules,
    kv_cache_rules,
)
