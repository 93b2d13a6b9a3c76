"""GPU benchmark: QLoRA SFT of a Llama-3-8B-architecture model, baselines and hf_instruct_tune side by side.

Every stack trains on the same 512 rows (log-normal lengths, median ~200 tokens, capped at 2048), the same
sampler order, 16 rows per optimizer step, LoRA r=16 on q,k,v,o,gate,up,down over an NF4 base that was
saved in bf16 and loaded in 4-bit. Each stack runs in its own process (Unsloth patches on import).

usage (on the GPU machine, see bench/run_gpu_bench.sh):
  python bench/gpu_bench.py make DIR                     # random-init model + Llama-3-style tokenizer
  python bench/gpu_bench.py train hf|unsloth DIR [--bs N --ga N --padding-free --no-ckpt]  # baselines, TRL
  python bench/gpu_bench.py train hit DIR --variants a,b  # hf_instruct_tune variants, one model load
                                                         # (lean16_it: lean16 through InstructTrainer)
  python bench/gpu_bench.py check                         # packed varlen == padded on a tiny model (GPU)
  python bench/gpu_bench.py all DIR OUTDIR                # everything, RESULT lines -> OUTDIR/gpu_bench.json
  python bench/gpu_bench.py report JSON [BENCHMARKS.md]   # write the '## GPU' section (here, after a run)
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

ARCH = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8)
VOCAB = 128256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, WARM = int(os.environ.get("BENCH_STEPS", 10)), 5  # BENCH_STEPS=6: a quicker smoke test

# name -> (rows per micro-batch, grad-accum, packed, attention, layers checkpointed, loss, embeddings on CPU)
VARIANTS = {
    "best": (16, 1, True, "torch_varlen", 27, "cce", False),
    "ckpt_all": (16, 1, True, "torch_varlen", 32, "cce", False),
    "chunked": (16, 1, True, "torch_varlen", 32, "chunked", False),
    "chunked_sel": (16, 1, True, "torch_varlen", 27, "chunked", False),
    "fast_sel24": (16, 1, True, "torch_varlen", 24, "cce", False),
    "fast_sdpa": (16, 1, True, "sdpa", 32, "cce", False),
    "fast_plainloss": (16, 1, True, "torch_varlen", 32, "plain", False),
    "lean_4x4": (4, 4, True, "torch_varlen", 32, "cce", False),
    "notebook": (4, 4, False, "sdpa", 32, "plain", False),
    # embeddings stay on the CPU from here on: keep these last
    "lean16": (16, 1, True, "torch_varlen", 32, "cce", True),
    "lean": (8, 2, True, "torch_varlen", 32, "cce", True),
}
DEFAULT_VARIANTS = "best,ckpt_all,notebook,lean16,lean"
# the same settings, driven by hf_instruct_tune.InstructTrainer (packing=True, fused_loss=True) on pre-tokenized rows
INSTRUCT_VARIANTS = {"lean16_it": "lean16"}
# packed varlen against padded sdpa in bf16 on the GPU: beyond these, `check` fails the run
CHECK_LOSS_TOLERANCE, CHECK_GRAD_TOLERANCE = 5e-3, 3e-2


def make(out: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    arch = ARCH if not os.environ.get("BENCH_TINY") else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if os.environ.get("BENCH_LAYERS"):  # the architecture's layers, fewer of them (a compile-time check)
        arch = {**arch, "num_hidden_layers": int(os.environ["BENCH_LAYERS"])}
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, **arch)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
             128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128009: "<|eot_id|>"}
    specials = {i: named.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, VOCAB)}
    vocab = {specials.get(i, f"t{i}"): i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>",
                                   additional_special_tokens=[v for k, v in sorted(specials.items())
                                                              if k not in (128000, 128001, 128004)])
    fast.save_pretrained(out)
    print(json.dumps({"made": out, "params": sum(p.numel() for p in model.parameters())}))


def rows(n: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """Rows whose token lengths follow a long-tailed, Alpaca-like shape (median ~200)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(2047, max(24, rng.lognormvariate(math.log(200), 0.75))))  # 2048 with the EOS
        out.append({"text": " ".join(f"t{rng.randrange(1000, 120000)}" for _ in range(length))})
    return out


class _Clock:
    """Stamps (time, real tokens so far) at each optimizer step's log."""

    def __init__(self):
        self.stamps: list[tuple[float, int]] = []
        self.tokens = 0
        self.losses: list[float] = []

    def callback(self):
        import torch
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    clock.stamps.append((time.perf_counter(), clock.tokens))
                    clock.losses.append(float(logs["loss"]))

        return Clock()

    def result(self, **extra) -> dict:
        import torch

        cuda = torch.cuda.is_available()
        (t_a, n_a), (t_b, n_b) = self.stamps[WARM - 1], self.stamps[-1]
        return dict(extra, steps=len(self.stamps), mean_step_s=(t_b - t_a) / (len(self.stamps) - WARM),
                    real_tokens_per_s=(n_b - n_a) / (t_b - t_a), timed_tokens=n_b - n_a,
                    peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                    peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
                    losses=self.losses,
                    step_s=[round(b[0] - a[0], 3) for a, b in zip(self.stamps, self.stamps[1:])])


def _sft_config(bs: int, ga: int, **kw):
    import torch
    from trl import SFTConfig

    if not torch.cuda.is_available():  # CPU smoke test
        kw.update(bf16=False, use_cpu=True)
    kw.setdefault("bf16", True)

    return SFTConfig(output_dir="/tmp/sft-out", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     warmup_steps=5, max_steps=STEPS, learning_rate=2e-4, logging_steps=1,
                     save_strategy="no", report_to=[], max_length=2048, dataloader_num_workers=0, seed=0, **kw)


def train_baseline(stack: str, path: str, bs: int = 4, ga: int = 4, padding_free: bool = False,
                   ckpt: bool = True) -> None:
    """(a) transformers+peft+bitsandbytes and (b) Unsloth through TRL's SFTTrainer, on the same token ids.

    Default: the notebook's shape (4 x 4, padded, checkpointing). The rows are pre-tokenized by
    :func:`_features`, so every stack trains on the same tokens (EOS included) in the same order.
    """
    import torch

    if stack == "unsloth":
        from unsloth import FastLanguageModel  # before trl/peft/transformers

        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=2048, dtype=None, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth" if ckpt else False)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(path)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    from datasets import Dataset
    from trl import SFTTrainer

    clock = _Clock()

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        clock.tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    cfg = _sft_config(bs, ga, gradient_checkpointing=(stack == "hf" and ckpt), padding_free=padding_free)
    ids = Dataset.from_list([{"input_ids": f["input_ids"]} for f in _features(tok)])
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ids, processing_class=tok, callbacks=[clock.callback()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    variant = f"{bs}x{ga} {'padding-free' if padding_free else 'padded'}{'' if ckpt else ', no checkpointing'}"
    print("RESULT " + json.dumps(clock.result(stack=stack, variant=variant, rows=bs, grad_accum=ga,
                                              padding_free=padding_free, ckpt=ckpt)))


def _features(tok) -> list[dict[str, list[int]]]:
    """Tokenize like TRL does for a text dataset (EOS appended, truncated to 2048); every token supervised."""
    eos = tok.eos_token_id
    out = []
    for row in rows():
        ids = (tok(row["text"], add_special_tokens=False)["input_ids"] + [eos])[:2048]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _padded_collate(features, pad_id: int):
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id)
    labels = torch.full((len(features), width), -100)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_fn(kind: str):
    """Sum of token cross-entropies from final hidden states [N, h], without [N, V] fp32 logits if possible."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def plain(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100, reduction="sum")

    if kind == "plain":
        return plain, "plain"
    if kind == "cce":
      try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y):
            return linear_cross_entropy(h, w.to(h.dtype), y, ignore_index=-100, reduction="sum")

        return cce, "cce"
      except Exception as e:  # noqa: BLE001 - report, fall back to chunks
        print(f"cut_cross_entropy unavailable ({type(e).__name__}: {e}); chunked loss", file=sys.stderr)

    def chunked(h, w, y, chunk=1024):  # logits of one chunk at a time, recomputed in backward
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk):
            total = total + checkpoint(plain, h[s:s + chunk], w, y[s:s + chunk], use_reentrant=False)
        return total

    return chunked, "chunked"


def train_hit(path: str, variants: list[str]) -> None:
    """hf_instruct_tune: backends.load_for_training + add_lora, packed isolated batches, fused loss."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    import gc

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from hf_instruct_tune.backends import add_lora, load_for_training, offload_input_embeddings
    from hf_instruct_tune.packing import pack_features, register_varlen_attention

    register_varlen_attention()
    cuda = torch.cuda.is_available()  # False only in a CPU smoke test (BENCH_TINY)
    tok = AutoTokenizer.from_pretrained(path)
    feats = _features(tok)
    base, _ = load_for_training(path, backend="transformers", load_in_4bit=cuda, dtype=torch.bfloat16,
                                attn_implementation="sdpa")
    for name in variants:
        if name in INSTRUCT_VARIANTS:
            base = _train_instruct(base, tok, feats, name, cuda)
            continue
        bs, ga, packed, attn, n_ckpt, loss_kind, embed_cpu = VARIANTS[name]
        if not cuda and attn == "torch_varlen":
            attn = "sdpa"
        trainer = model = lm_head = None
        try:
            base.config._attn_implementation = attn
            for m in base.modules():
                if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                    m.config._attn_implementation = attn
            if embed_cpu and not getattr(base, "_embed_on_cpu", False):
                offload_input_embeddings(base)
                base._embed_on_cpu = True
            lm_head = base.lm_head
            base.lm_head = torch.nn.Identity()  # forward (through DDP when launched so) returns hidden states
            model = add_lora(base, backend="transformers", r=16, lora_alpha=16, gradient_checkpointing=n_ckpt > 0)
            layers = model.get_base_model().model.layers
            for i, layer in enumerate(layers):  # selective: the first n_ckpt layers recompute, the rest keep
                layer.gradient_checkpointing = i < n_ckpt
            loss_fn, loss_used = _loss_fn(loss_kind)
            clock = _Clock()
            flash = attn == "torch_varlen"
            collate = ((lambda f: pack_features(f, tok.pad_token_id, flash_attn_kwargs=flash)) if packed
                       else (lambda f: _padded_collate(f, tok.pad_token_id)))

            class Trainer(SFTTrainer):
                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                    labels = inputs.pop("labels")
                    mask = inputs.get("attention_mask")
                    clock.tokens += int(mask.sum()) if mask is not None else labels.numel()
                    hidden = model(**inputs).logits  # lm_head is an Identity: final normed hidden states
                    # (accelerate's autocast wrapper returns model outputs in fp32: back to the head's dtype)
                    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(lm_head.weight.dtype)
                    y = labels[:, 1:].reshape(-1)
                    if num_items_in_batch is None:
                        return loss_fn(h, lm_head.weight, y) / (y != -100).sum()
                    scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
                    return loss_fn(h, lm_head.weight, y) * scale / num_items_in_batch

            cfg = _sft_config(bs, ga, gradient_checkpointing=False, remove_unused_columns=False,
                              dataset_kwargs={"skip_prepare_dataset": True}, ddp_find_unused_parameters=False)
            trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(feats), processing_class=tok,
                              data_collator=collate, callbacks=[clock.callback()])
            trainer.model_accepts_loss_kwargs = True  # compute_loss divides by num_items_in_batch itself
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            print("RESULT " + json.dumps(clock.result(stack="hit", variant=name, rows=bs, grad_accum=ga,
                                                      packed=packed, attn=attn, ckpt_layers=n_ckpt,
                                                      loss=loss_used, embed_cpu=embed_cpu,
                                                      world=trainer.accelerator.num_processes,
                                                      rank=trainer.accelerator.process_index)), flush=True)
        except Exception as e:  # noqa: BLE001 - one variant failing should not hide the others
            _report_failure(name, e)
        finally:
            trainer = model = None
            base = _strip_lora(base)
            if lm_head is not None and isinstance(base.lm_head, torch.nn.Identity):
                base.lm_head = lm_head
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def _train_instruct(base, tok, feats, name: str, cuda: bool):
    """A variant through the package's own trainer: InstructTrainer(fused_loss=True) with args.packing=True."""
    import gc

    import torch
    from datasets import Dataset

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.backends import add_lora, offload_input_embeddings
    from hf_instruct_tune.loss import cce_available

    bs, ga, packed, attn, n_ckpt, loss_kind, embed_cpu = VARIANTS[INSTRUCT_VARIANTS[name]]
    if not cuda and attn == "torch_varlen":
        attn = "sdpa"
    trainer = model = None
    try:
        base.config._attn_implementation = attn
        for m in base.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = attn
        if embed_cpu and not getattr(base, "_embed_on_cpu", False):
            offload_input_embeddings(base)
            base._embed_on_cpu = True
        model = add_lora(base, backend="transformers", r=16, lora_alpha=16, gradient_checkpointing=n_ckpt > 0)
        for i, layer in enumerate(model.get_base_model().model.layers):
            layer.gradient_checkpointing = i < n_ckpt
        clock = _Clock()

        class Counting(InstructTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                mask = inputs.get("attention_mask")
                clock.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        cfg = _sft_config(bs, ga, gradient_checkpointing=False, packing=packed, ddp_find_unused_parameters=False)
        trainer = Counting(model=model, args=cfg, train_dataset=Dataset.from_list(feats), processing_class=tok,
                           fused_loss=loss_kind != "plain", callbacks=[clock.callback()])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        loss_used = ("cce" if cce_available(torch.device("cuda")) and cuda else "chunked") if trainer.fused_loss else "plain"
        print("RESULT " + json.dumps(clock.result(
            stack="hit", variant=name, trainer="InstructTrainer", rows=bs, grad_accum=ga, packed=packed, attn=attn,
            ckpt_layers=n_ckpt, loss=loss_used, embed_cpu=embed_cpu,
            flash_kwargs=trainer.data_collator.flash_attn_kwargs, world=trainer.accelerator.num_processes,
            rank=trainer.accelerator.process_index)), flush=True)
    except Exception as e:  # noqa: BLE001 - one variant failing should not hide the others
        _report_failure(name, e)
    finally:
        trainer = model = None
        base = _strip_lora(base)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return base


def _report_failure(variant: str, error: Exception) -> None:
    """Print the traceback and a RESULT line with the error, so one failing variant does not hide the others."""
    import traceback

    traceback.print_exc()
    print("RESULT " + json.dumps(dict(stack="hit", variant=variant, error=f"{type(error).__name__}: {error}"[:300])),
          flush=True)


def _strip_lora(base):
    """Remove the adapters so that the next variant starts from the same 4-bit base."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(base.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())
    for p in base.parameters():
        p.requires_grad_(False)
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


def check() -> None:
    """On the GPU: a packed batch through torch_varlen gives the padded sdpa loss and gradients (bf16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_instruct_tune.packing import pack_features, register_varlen_attention

    register_varlen_attention()
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(6):
        ids = torch.randint(3, 1000, (int(torch.randint(20, 300, (1,), generator=g)),), generator=g).tolist() + [2]
        feats.append({"input_ids": ids, "labels": [-100] * 10 + ids[10:]})
    out = {}
    for attn in ("sdpa", "torch_varlen"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
        cfg._attn_implementation = "sdpa" if attn == "sdpa" else attn
        model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).train()
        for mode in ("padded", "packed"):
            batch = _padded_collate(feats, 0) if mode == "padded" else pack_features(feats, 0,
                                                                                      flash_attn_kwargs=True)
            batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            out[(attn, mode)] = (loss.float().item(), grad)
    ref_loss, ref_grad = out[("sdpa", "padded")]
    failed = []
    for key, (loss, grad) in out.items():
        rel = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        ok = abs(loss - ref_loss) <= CHECK_LOSS_TOLERANCE * abs(ref_loss) and rel <= CHECK_GRAD_TOLERANCE
        print(f"CHECK {key[0]:13s} {key[1]:7s} loss={loss:.5f} (padded sdpa {ref_loss:.5f}) grad rel diff={rel:.2e}"
              f" {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(key)
    if failed:
        sys.exit(f"CHECK FAILED: {failed} differ from padded sdpa beyond loss {CHECK_LOSS_TOLERANCE:.0e} (relative) "
                 f"or gradient {CHECK_GRAD_TOLERANCE:.0e} (relative norm)")


def run_all(path: str, outdir: str, stacks: list[str], variants: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    results = []
    here = os.path.abspath(__file__)
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, here, "make", path], check=True)
    for stack in stacks:
        cmd = [sys.executable, here, "train", stack, path] + (["--variants", variants] if stack == "hit" else [])
        t0 = time.time()
        log = os.path.join(outdir, f"log_{stack}.txt")
        with open(log, "w") as fh:
            try:
                subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=int(os.environ.get("STACK_TIMEOUT", 400)))
            except subprocess.TimeoutExpired:
                results.append(dict(stack=stack, error="timeout"))
        for line in open(log):
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                print(line.strip(), flush=True)
        print(f"== {stack} done in {time.time() - t0:.0f}s", flush=True)
        with open(os.path.join(outdir, "gpu_bench.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| stack | setting | real tok/s | step s | peak alloc GiB | peak reserved GiB | loss @ step 10 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stack']} | {r.get('variant', '')} | failed: {r['error'][:80]} | | | | |")
            continue
        setting = r["variant"]
        if r["stack"] == "hit":
            setting = (f"{r['variant']}: {'packed' if r['packed'] else 'padded'}, {r['rows']} rows x ga {r['grad_accum']},"
                       f" {r['attn']}, ckpt {r['ckpt_layers']}/32, loss {r['loss']}"
                       f"{', embeddings on CPU' if r.get('embed_cpu') else ''}"
                       f"{', via InstructTrainer(fused_loss=True), args.packing' if r.get('trainer') else ''}"
                       f"{', DDP %d GPUs, rank %d' % (r['world'], r['rank']) if r.get('world', 1) > 1 else ''}")
        lines.append(f"| {r['stack']} | {setting} | {r['real_tokens_per_s']:,.0f} | {r['mean_step_s']:.2f} | "
                     f"{r['peak_alloc_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {r['losses'][-1]:.3f} |")
    return "\n".join(lines)


def multi_table(results: list[dict]) -> str:
    """1 GPU against DDP: tokens/s per GPU, total, and scaling efficiency (total / (N x one GPU))."""
    ok = [r for r in results if "error" not in r]
    one = [r for r in ok if r.get("world", 1) == 1]
    ddp = [r for r in ok if r.get("world", 1) > 1]
    lines = ["| setup | real tok/s per GPU | total real tok/s | step s | peak alloc GiB per GPU | scaling efficiency |",
             "|---|---:|---:|---:|---:|---:|"]
    if one:
        r = one[0]
        lines.append(f"| 1 GPU, {r['variant']} | {r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['mean_step_s']:.2f} | {r['peak_alloc_gib']:.1f} | 100% |")
    if ddp:
        # each rank reports its own tokens/s; rank 0 alone may be in the log: scale the mean by the world size
        n = ddp[0]["world"]
        total = n * sum(r["real_tokens_per_s"] for r in ddp) / len(ddp)
        eff = f"{total / (n * one[0]['real_tokens_per_s']):.0%}" if one else "n/a"
        lines.append(f"| DDP {n} GPUs, {ddp[0]['variant']} | {total / n:,.0f} | {total:,.0f} | "
                     f"{max(r['mean_step_s'] for r in ddp):.2f} | {max(r['peak_alloc_gib'] for r in ddp):.1f} | {eff} |")
    for r in results:
        if "error" in r:
            lines.append(f"| failed: {r['error'][:100]} | | | | | |")
    return "\n".join(lines)


def report(json_path: str, md_path: str = "BENCHMARKS.md", section_name: str = "GPU") -> None:
    """Replace (or add) the '## GPU' (or '## Multi-GPU') section of BENCHMARKS.md from a run's JSON."""
    results = json.load(open(json_path))
    notes = {"GPU": "gpu_bench_notes.md", "Multi-GPU": "multi_gpu_notes.md"}[section_name]
    intro = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), notes)).read().strip()
    body = table(results) if section_name == "GPU" else multi_table(results)
    section = f"## {section_name}\n\n{intro}\n\n{body}\n"
    text = open(md_path).read() if os.path.exists(md_path) else "# Benchmarks\n"
    start = text.find(f"\n## {section_name}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + (text[end:] if end >= 0 else "")
    open(md_path, "w").write(text)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "train" and sys.argv[2] == "hit":
        v = sys.argv[sys.argv.index("--variants") + 1] if "--variants" in sys.argv else DEFAULT_VARIANTS
        train_hit(sys.argv[3], v.split(","))
    elif cmd == "train":
        opts = sys.argv[4:]
        shape = dict(bs=int(opts[opts.index("--bs") + 1]) if "--bs" in opts else 4,
                     ga=int(opts[opts.index("--ga") + 1]) if "--ga" in opts else 4)
        train_baseline(sys.argv[2], sys.argv[3], padding_free="--padding-free" in opts,
                       ckpt="--no-ckpt" not in opts, **shape)
    elif cmd == "check":
        check()
    elif cmd == "all":
        train_stacks = os.environ.get("STACKS", "hit,unsloth,hf").split(",")
        run_all(sys.argv[2], sys.argv[3], train_stacks, os.environ.get("VARIANTS", DEFAULT_VARIANTS))
    elif cmd == "report":
        report(*sys.argv[2:])
    elif cmd == "multi-table":
        print(multi_table(json.load(open(sys.argv[2]))))
    else:
        sys.exit(__doc__)
