"""slimquant.quantize(): a float HF checkpoint (or GGUF) -> the ascend W8A8 format, one decoder layer at a time."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from slimquant.format.architectures import EMBED_PREFIX, LAYER_PREFIX, ArchSpec, arch_spec, layer_index, layer_prefix
from slimquant.format.checkpoint import C8, ModelSlimWriter, is_modelslim_dir
from slimquant.format.dtypes import float_dtype
from slimquant.format.schemes import FLOAT, W8A8, quantizes_input
from slimquant.quant import steps
from slimquant.quant.activations import Activations, Spill
from slimquant.quant.calibration import load_texts, load_tokenizer, token_batches
from slimquant.quant.decoder import LayerRunner
from slimquant.quant.layer_quant import LayerJob, quantize_layer
from slimquant.quant.memory import map_large_allocations, peak_rss_bytes, return_freed_memory
from slimquant.quant.moe import is_routed_expert
from slimquant.quant.mtp import CONFIG_FIELDS as MTP_CONFIG
from slimquant.quant.mtp import check_mtp, mtp_input
from slimquant.quant.options import QuantizeOptions
from slimquant.quant.output import check_destination, folder_bytes, write_model_files
from slimquant.quant.plan import plan_types, recipe_note
from slimquant.quant.resume import Checkpoint, PartialRun, fingerprint
from slimquant.quant.rotation import RotatedSource
from slimquant.quant.sources import HFCheckpoint
from slimquant.quant.summary import QuantizeSummary

HEAD_WEIGHT = "lm_head.weight"
FP32_NOTE = (
    "a float32 model: slimquant runs it, vLLM-Ascend does not (its ascend quantization takes bf16 / fp16 models "
    "only); save the source in bf16 first for a checkpoint it loads"
)


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    quant_type: str = "w8a8",
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    **options,
) -> QuantizeSummary:
    """Quantize the HF folder or .gguf file `src` into the ascend (ModelSlim) folder `dst`; see docs/FORMAT.md.
    resume: go on from the last finished layer of an interrupted run into dst (quant/resume.py).

    options: QuantizeOptions.parse's keyword arguments (anti_outlier, alpha, rounding, calib_data, num_samples,
    seq_len, keep_float, mix, device, shard_size, batch_size, report, static_all, kv_cache), e.g.
    kv_cache: "int8" also calibrates int8 (C8) KV-cache scales (docs/FORMAT.md, "Int8 KV cache");
    report: also write the per-linear sensitivity report (sensitivity.md/.json/.png, quant/sensitivity.py) into dst;
    static_all: for quant_type w8a8, make every quantized linear static. By default Llama/Qwen models get
    mlp.down_proj W8A8_DYNAMIC (format.architectures.DOWN_DYNAMIC_MIX; the summary's "default mix" says so).
    """
    opts = QuantizeOptions.parse(quant_type, **options)
    return run(src, dst, opts, overwrite=overwrite, progress=progress, resume=resume)


def run(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    opts: QuantizeOptions,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> QuantizeSummary:
    """quantize() with its options parsed."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    map_large_allocations()
    partial = PartialRun(dst, fingerprint(src, opts))
    texts = load_texts(opts.calib_data)
    with _hf_folder(src, dst) as hf_dir:
        ckpt = opts.source(hf_dir)
        spec = arch_spec(ckpt.config)
        num_layers = int(ckpt.config["num_hidden_layers"])
        mtp = check_mtp(ckpt.keys(), num_layers) if opts.quant_mtp else []
        layers = num_layers + len(mtp)  # decoder layers to quantize
        plan = plan_types(spec, layers, opts.quant_type, list(opts.mix), list(opts.keep_float), ckpt.config,
                          static_all=opts.static_all)  # fmt: skip
        smoother = opts.smoother(spec.static_method if W8A8 in plan.values() else spec.dynamic_method)
        model_qtype = spec.model_quant_type or opts.quant_type
        tokenizer = load_tokenizer(hf_dir, opts.trust_remote_code)
        ids = token_batches(tokenizer, texts, opts.num_samples, opts.seq_len)  # [S, T]
        dtype = _model_dtype(ckpt)
        runner = LayerRunner(hf_dir, spec, dtype, opts.device)
        _check_complete(ckpt, runner, layers)
        if smoother.shifts:
            _check_shift_targets(spec, plan, num_layers, ckpt.config)
        kv_int8 = _check_kv_cache(spec, opts.kv_cache)
        job = LayerJob(spec, plan, smoother, opts.alpha_chooser(), opts.rounder(), dtype, opts.batch_size, ckpt.config,
                       kv_cache_int8=kv_int8, expert_group_bytes=opts.expert_memory,
                       spill=Spill(partial.spill_folder, opts.activation_memory))  # fmt: skip
        with partial.staged(resume, overwrite) as checkpoint:
            out = partial.path
            writer = ModelSlimWriter(out, model_qtype, opts.shard_bytes, kv_cache_type=C8 if kv_int8 else None)
            extra_layers = _convert(ckpt, runner, job, ids, writer, (num_layers, layers), progress, partial, checkpoint)
            resumed = checkpoint.layers_done if checkpoint else 0
            fields = (spec.config_fields or {}).get(opts.quant_type, {})
            write_model_files(hf_dir, out, ckpt.config | fields | (MTP_CONFIG if mtp else {}), spec.config_indent)
            if opts.report:
                _write_report(hf_dir, out, opts, progress, isinstance(ckpt, RotatedSource))
    counts = Counter(plan.values()) + Counter({FLOAT: 1})  # lm_head: the source's, or the tied embeddings

    return QuantizeSummary(
        output=dst,
        model_quant_type=model_qtype,
        anti_outlier=smoother.name,
        rotated=isinstance(ckpt, RotatedSource),
        linears=dict(sorted(counts.items())),
        num_layers=num_layers,
        float_layers=extra_layers,
        mtp_quantized=len(mtp),
        idle_experts=job.idle_experts,
        source_bytes=folder_bytes(src, "*.safetensors"),
        output_bytes=folder_bytes(dst),
        seconds=time.perf_counter() - start,
        report=dst / "sensitivity.md" if opts.report else None,
        default_mix=recipe_note(spec, opts.quant_type, opts.static_all, plan),
        notes=[FP32_NOTE] if dtype == torch.float32 else [],
        kv_cache="int8 (C8)" if kv_int8 else "float",
        peak_rss_bytes=peak_rss_bytes(),
        resumed_layers=resumed,
    )


def _write_report(hf_dir: Path, out: Path, opts: QuantizeOptions, progress: bool, rotated: bool) -> None:
    """Per-linear sensitivity of the checkpoint just written in out, saved beside it."""
    from slimquant.quant.sensitivity import measure_sensitivity

    kw = dict(num_samples=opts.num_samples, seq_len=opts.seq_len, batch_size=opts.batch_size, device=opts.device,
              trust_remote_code=opts.trust_remote_code, rotate=rotated)  # fmt: skip
    measure_sensitivity(hf_dir, out, calib_data=opts.calib_data, progress=progress, **kw).save(out)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise ValueError(f"{src} does not exist; pass a Hugging Face model folder or a .gguf file")
    if is_modelslim_dir(src):
        raise ValueError(f"{src} is already an ascend (ModelSlim) checkpoint; pass the float model it came from")
    a, b = src.resolve(), dst.resolve()
    if a == b or b in a.parents or a in b.parents:
        raise ValueError(f"DST {dst} must be outside SRC {src} (and SRC outside DST); choose another folder")
    check_destination(dst, overwrite)


@contextmanager
def _hf_folder(src: Path, dst: Path) -> Iterator[Path]:
    """src itself, or for a .gguf file a temporary HF folder converted from it (removed afterwards)."""
    if src.suffix != ".gguf":
        yield src
        return
    from slimquant.quant.gguf import gguf_to_hf

    tmp = dst.parent / f".{dst.name}.gguf-{os.getpid()}"
    try:
        yield Path(gguf_to_hf(src, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_dtype(ckpt: HFCheckpoint) -> torch.dtype:
    """The dtype of float tensors: config dtype/torch_dtype, else that of the embeddings."""
    named = float_dtype(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "")
    return named or float_dtype(ckpt.get(EMBED_PREFIX + "weight").dtype) or torch.bfloat16


def _check_kv_cache(spec: ArchSpec, kv_cache: str) -> bool:
    """Whether to calibrate int8 KV-cache scales; ValueError for a model whose cache cannot take them."""
    if kv_cache == "int8" and not spec.int8_kv_cache:
        raise ValueError(
            f"--kv-cache int8 is for standard attention; {spec.model_class} uses MLA, whose cache holds one latent "
            "vector per token (vLLM-Ascend quantizes it with FAKQuant, which slimquant does not run)"
        )
    return kv_cache == "int8"


def _check_shift_targets(spec: ArchSpec, plan: dict[str, str], n: int, config: dict) -> None:
    """The iterative shift gives each linear a norm feeds a bias (W @ shift). A static W8A8 linear carries it in its
    quant_bias; a dynamic or float one needs a bias parameter, and vLLM-Ascend drops the bias of a module its model
    builds without one: wrong output there, so refuse before anything is written."""
    bad = []
    for i in range(n):
        linears = spec.layer_linears(config, i)
        for producer, group in spec.layer_smooth_pairs(linears):
            types = {r: plan[layer_prefix(i) + r] for r in group}
            if producer not in linears and quantizes_input(types.values()):  # a smoothed norm: it shifts
                bad += [layer_prefix(i) + r for r, t in types.items() if t != W8A8 and not spec.has_bias(config, r)]
    if bad:
        raise ValueError(
            f"--anti-outlier iterative would give {len(bad)} bias-free linears a bias (e.g. {bad[0]}, "
            f"{plan[bad[0]]}), which vLLM-Ascend drops: its output would be wrong there. Use --anti-outlier "
            "smoothquant (no shift), or quantize those linears static W8A8 (their quant_bias carries the shift)"
        )


def _check_complete(ckpt: HFCheckpoint, runner: LayerRunner, num_layers: int) -> None:
    """Every tensor the layers need is present, before any work starts."""
    need = [EMBED_PREFIX + "weight"] + [layer_prefix(i) + r for i in range(num_layers) for r in runner.param_names(i)]
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise ValueError(
            f"{ckpt.path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}; "
            "a shard is missing or the checkpoint is incomplete: download it again"
        )


def _convert(
    ckpt,
    runner,
    job: LayerJob,
    ids,
    writer: ModelSlimWriter,
    layers: tuple[int, int],
    progress: bool,
    partial: PartialRun,
    checkpoint: Checkpoint | None,
) -> int:
    """Embeddings, each decoder layer (calibrated on the quantized output of the previous, checkpointed after
    each), then the rest FLOAT; from the checkpoint's layer on where there is one. layers: (num_hidden_layers,
    decoder layers to quantize), the second larger by the MTP layers quantized with --quant-mtp (quant/mtp.py).

    The rest includes layers past those (DeepSeek's multi-token-prediction layers without --quant-mtp): written as
    they are, so that a reader finds every key. Returns how many such layers there were.
    """
    num_layers, total = layers
    head, tail = _outer_names(ckpt, total)
    if checkpoint is None:
        hidden = _embed(ckpt, runner, job, ids, writer, head)  # batches [B, T, H]
        first = 0
    else:
        writer.restore(checkpoint.writer)
        job.idle_experts, job.alphas = checkpoint.job["idle_experts"], checkpoint.job["alphas"]
        hidden, first = Activations.load(checkpoint.hidden, job.spill, runner.device), checkpoint.layers_done
    bar = tqdm(range(first, total), desc="quantizing", unit="layer", disable=not progress, initial=first, total=total)
    for i in bar:
        prefix = layer_prefix(i)
        state = {r: ckpt.get(prefix + r) for r in runner.param_names(i) if not is_routed_expert(r)}
        fetch = lambda rel, p=prefix: ckpt.get(p + rel)  # noqa: E731
        if i < num_layers:
            out = quantize_layer(i, state, runner, job, hidden, writer, fetch)
        else:
            out = _quantize_mtp_layer(i, num_layers, ckpt, ids, state, runner, job, hidden, writer, fetch)
        hidden.release()
        hidden = out
        partial.save(i + 1, hidden, writer.state(), {"idle_experts": job.idle_experts, "alphas": job.alphas})
        return_freed_memory()
        bar.set_postfix_str(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    for name in tail:
        writer.add(name, ckpt.get(name).to(_float_dtype(name, job.dtype)), FLOAT)
    if tied_head(ckpt):  # vLLM-Ascend looks lm_head up in the description: written as ModelSlim V1 writes it
        writer.add(HEAD_WEIGHT, ckpt.get(EMBED_PREFIX + "weight").to(job.dtype), FLOAT)
    hidden.release()
    writer.close()
    return len({layer_index(k) for k in tail} - {None})


def _quantize_mtp_layer(i, num_layers, ckpt, ids, state, runner, job: LayerJob, hidden, writer, fetch):
    """MTP layer i (quant/mtp.py) quantized without smoothing, as ModelSlim does, on its own input; its other
    tensors (enorm, hnorm, eh_proj, embed_tokens, shared_head) written float. Returns its output."""
    eps, ids = float(ckpt.config.get("rms_norm_eps", 1e-6)), ids.split(job.batch_size)  # hidden's batches
    x = hidden.map(lambda b, h: mtp_input(ckpt, i, num_layers, ids[b], h, eps))  # [B, T - d, H] each
    mtp_job = dataclasses.replace(job, smoother=steps.smoother("none"))
    out = quantize_layer(i, state, runner, mtp_job, x, writer, fetch)
    x.release()
    job.idle_experts = mtp_job.idle_experts
    prefix, names = layer_prefix(i), set(runner.param_names(i))
    for name in [k for k in ckpt.keys() if k.startswith(prefix) and k[len(prefix) :] not in names]:
        writer.add(name, ckpt.get(name).to(job.dtype), FLOAT)
    return out


def _embed(ckpt, runner, job: LayerJob, ids: torch.Tensor, writer: ModelSlimWriter, head: list[str]) -> Activations:
    """Write the embeddings; the calibration tokens' hidden states in the compute dtype, batch_size samples a batch
    ([B, T, H] each, the split every layer keeps)."""
    embed = ckpt.get(EMBED_PREFIX + "weight").to(runner.device, job.dtype)  # [V, H]
    rows = ids.split(job.batch_size)  # [B, T] each
    batches = (F.embedding(r.to(runner.device), embed).to(runner.dtype) for r in rows)
    hidden = Activations.of(batches, job.spill, runner.device)
    del embed
    for name in head:
        writer.add(name, ckpt.get(name).to(job.dtype), FLOAT)
    return hidden


def tied_head(ckpt: HFCheckpoint) -> bool:
    """Whether the model's LM head is its embeddings (tie_word_embeddings, no lm_head.weight of its own)."""
    return bool(ckpt.config.get("tie_word_embeddings")) and HEAD_WEIGHT not in ckpt


def _float_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """FLOAT tensors are written in the model dtype, except the router's correction bias (fp32, as on disk)."""
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype


def _outer_names(ckpt: HFCheckpoint, num_layers: int) -> tuple[list[str], list[str]]:
    """Tensors outside decoder layers 0..num_layers-1: (embeddings, extra layers then model.* then lm_head)."""
    outer = [k for k in ckpt.keys() if (layer_index(k) or 0) >= num_layers or not k.startswith(LAYER_PREFIX)]
    head = [k for k in outer if k.startswith(EMBED_PREFIX)]
    rank = {k: (layer_index(k) is None, not k.startswith("model.")) for k in outer}
    return head, sorted((k for k in outer if k not in head), key=rank.__getitem__)
