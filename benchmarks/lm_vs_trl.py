r"""ΨPO training throughput (response tokens/s) against TRL's DPOTrainer (IPO).

  PYTHONPATH=. python benchmarks/lm_vs_trl.py [--workload=fixed,hh]
      [--steps=4] [--packing [--share-prompts] [--packed-row-length=N]]
      [--attention=blocked] [--unrolled] [--remat-policy=dots_saveable]
      [--reference=precomputed|on-device]

The same Llama-style model shape is built from scratch on both sides
(psipo_jax's `model.preset="small"`; a `transformers.LlamaConfig` of the same
sizes for TRL): vocab 4,096, d 256, 4 layers, 4 heads, 2 KV heads (head
dim 64), MLP 688, untied embeddings, RoPE θ 1e4, RMSNorm ε 1e-5, float32,
CPU, 2 threads. Same loss (IPO, τ = β = 0.1, the per-token mean of each
response's log-ratio, which is what TRL's "ipo" computes), same optimiser
(AdamW, lr 1e-5, β 0.9/0.999, ε 1e-8, no weight decay, constant rate,
gradient clipping at norm 1), same pairs per step (8), the same token ids
in the same batches.

Workloads:
  fixed  8 pairs per step, prompt 64 + response 64 tokens on both sides
         (random token ids).
  hh     pairs whose (prompt, chosen, rejected) lengths are those of real
         Anthropic HH pairs (../shared/data/hh_harmless_test_lengths.json,
         a seeded sample), filled with random letters, byte tokenizer (BOS
         before the prompt, EOS after each response), max_length 1,024.
         The pairs go through psipo_jax's data pipeline (truncation: the
         prompt is cut first, never below 256 tokens, then the responses;
         `psipo_jax.data.encoding`), and TRL is given exactly the token ids
         of those rows, so both sides train on identical sequences.

Each side runs 2 epochs of `--steps` steps over the same pairs in the same
order (TRL's sampler is made sequential) and times epoch 2 only (epoch 1
compiles / warms up), from the batch in memory to the updated parameters
(forward, backward, clipping, AdamW); response tokens are counted from the
batches (chosen + rejected, EOS included). Reference log-probs, by
`--reference`:
  precomputed (default)  ours: python -m psipo_jax.precompute_reference's
                         job (hh) / one jitted forward (fixed) before
                         training, carried in the batch; TRL:
                         precompute_ref_log_probs=True. Not timed.
  on-device              both run the frozen reference's forward each step.

What each side does beyond that is printed with the figures: ours scores
only response positions in the LM head (`logprobs="chunked"`), and for hh
pads each batch to its longest row (or packs several pairs per row with
--packing; with --share-prompts each pair's prompt once,
`input.share_prompts`, which on the fixed work packs its pairs the same
way, through the pipeline's packer; --unrolled runs our layers one after
another, `model.scan_layers=False`; --remat-policy=P rematerialises each
block, `model.remat=True`, `model.remat_policy=P`); TRL 1.16 scores
only completion positions too (its fused LM head, on by default) and pads
to the longest (its `padding_free=True` is disabled in 1.16: it warns and
falls back to padding).

TRL and torch live in their own virtualenv, made on first use (--venv,
default ~/.cache/psipo_jax/lm_vs_trl_venv): `pip install torch==2.13.0` (the
CPU wheel already on this kind of machine: always this exact pin, any other
spec downloads a multi-GB CUDA build), then `pip install trl==1.16.0`. TRL
runs in a subprocess of that venv; this process runs psipo_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

TORCH_PIN = "torch==2.13.0"
TRL_VERSION = "1.16.0"
DEFAULT_VENV = os.path.join(
  os.path.expanduser("~"), ".cache", "psipo_jax", "lm_vs_trl_venv"
)
PAIRS_PER_STEP = 8
EPOCHS = 2  # epoch 1 warms up, epoch 2 is timed
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 256
FIXED_PROMPT = FIXED_RESPONSE = 64
# The shape (psipo_jax preset "small"), spelled out for transformers.
SHAPE = dict(
  vocab_size=4096,
  num_layers=4,
  embed_dim=256,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
  mlp_dim=688,
  rope_theta=10_000.0,
  norm_eps=1e-5,
)
BYTE_PAD, BYTE_BOS, BYTE_EOS = 0, 1, 2  # psipo_jax's byte tokenizer ids


# --------------------------------------------------------------- TRL side
# Runs in the TRL virtualenv: torch, transformers, trl, datasets; no JAX.


def trl_worker(spec_path: str) -> None:
  """Trains TRL's DPOTrainer on the pairs of `spec_path`; prints one JSON line."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  from datasets import Dataset  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models as tok_models  # pylint: disable=g-import-not-at-top

  spec = json.loads(pathlib.Path(spec_path).read_text())
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  s = spec["shape"]
  config = transformers.LlamaConfig(
    vocab_size=s["vocab_size"],
    hidden_size=s["embed_dim"],
    intermediate_size=s["mlp_dim"],
    num_hidden_layers=s["num_layers"],
    num_attention_heads=s["num_heads"],
    num_key_value_heads=s["num_kv_heads"],
    head_dim=s["head_dim"],
    rope_theta=s["rope_theta"],
    rms_norm_eps=s["norm_eps"],
    max_position_embeddings=spec["max_length"],
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    pad_token_id=BYTE_PAD,
    bos_token_id=BYTE_BOS,
    eos_token_id=BYTE_EOS,
  )
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  # TRL wants a tokenizer for its pad id; the data arrive as token ids.
  vocab = {f"<{i}>": i for i in range(s["vocab_size"])}
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<3>")),
    pad_token=f"<{BYTE_PAD}>",
    bos_token=f"<{BYTE_BOS}>",
    eos_token=f"<{BYTE_EOS}>",
  )
  step_seconds: list[float] = []
  step_tokens: list[int] = []
  losses: list[float] = []

  class Timer(transformers.TrainerCallback):
    """Wall time of each optimiser step: on_step_begin is after the batch
    is fetched, on_step_end after the optimiser's update."""

    def on_step_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      step_seconds.append(time.perf_counter() - self.start)

  class Trainer(trl.DPOTrainer):
    def _prepare_dataset(self, dataset, *args, **kwargs):
      del args, kwargs  # Already token ids (prompt_ids, chosen_ids, ...).
      return dataset

    def _get_train_sampler(self, *args, **kwargs):
      del args, kwargs  # The batches of the JAX side, in their order.
      return torch.utils.data.SequentialSampler(self.train_dataset)

    def training_step(self, model, inputs, *args, **kwargs):
      step_tokens.append(int(inputs["completion_mask"].sum()))
      loss = super().training_step(model, inputs, *args, **kwargs)
      losses.append(float(loss))
      return loss

  on_device = spec["reference"] == "on-device"
  args = trl.DPOConfig(
    output_dir=spec["output_dir"],
    loss_type=["ipo"],
    beta=spec["tau"],
    learning_rate=spec["learning_rate"],
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    per_device_train_batch_size=spec["pairs_per_step"],
    gradient_accumulation_steps=1,
    num_train_epochs=spec["epochs"],
    max_length=spec["max_length"],
    padding_free=False,  # disabled in TRL 1.16 (falls back to padding)
    precompute_ref_log_probs=not on_device,
    precompute_ref_batch_size=spec["pairs_per_step"],
    use_cpu=True,
    bf16=False,
    fp16=False,
    seed=spec["seed"],
    dataloader_num_workers=0,
    logging_steps=10**6,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
  )
  ref_model = None
  if on_device:  # A from-scratch policy has no checkpoint to load it from.
    import copy  # pylint: disable=g-import-not-at-top

    ref_model = copy.deepcopy(model)
  trainer = Trainer(
    model=model,
    ref_model=ref_model,
    args=args,
    train_dataset=Dataset.from_list(spec["pairs"]),
    processing_class=tokenizer,
    callbacks=[Timer()],
  )
  trainer.train()
  bad = [
    i
    for i, loss in enumerate(losses)
    if not loss == loss or abs(loss) == float("inf")
  ]
  if bad:
    raise FloatingPointError(f"TRL: non-finite loss at steps {bad}")
  print(
    "TRL_RESULT "
    + json.dumps(
      {
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
        "versions": {
          "trl": trl.__version__,
          "torch": torch.__version__,
          "transformers": transformers.__version__,
        },
        "attn_implementation": model.config._attn_implementation,  # pylint: disable=protected-access
      }
    ),
    flush=True,
  )


# ---------------------------------------------------- the TRL virtualenv


def ensure_venv(venv: str, trl_version: str) -> str:
  """The venv's python, with torch==2.13.0 and trl==`trl_version`."""
  python = os.path.join(venv, "bin", "python")
  if not os.path.exists(python):
    print(f"creating {venv} (torch and TRL, ~1.5 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  probe = subprocess.run(
    [
      python,
      "-c",
      "import torch, trl; print(torch.__version__, trl.__version__)",
    ],
    capture_output=True,
    text=True,
  )
  have = probe.stdout.split() if probe.returncode == 0 else []
  if len(have) != 2 or not have[0].startswith("2.13.0"):
    # Exactly this pin: it is the CPU wheel cached here; anything else pulls
    # a multi-GB CUDA build.
    subprocess.run(
      [python, "-m", "pip", "install", "-q", TORCH_PIN], check=True
    )
  if len(have) != 2 or have[1] != trl_version:
    subprocess.run(
      [python, "-m", "pip", "install", "-q", f"trl=={trl_version}"], check=True
    )
  return python


def run_trl(python: str, spec: dict, tmp: str) -> dict:
  path = os.path.join(tmp, f"trl_{spec['name']}.json")
  pathlib.Path(path).write_text(json.dumps(spec))
  env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
  env.pop("PYTHONPATH", None)  # psipo_jax and JAX stay out of TRL's process
  result = subprocess.run(
    [python, os.path.abspath(__file__), "--trl-worker", path],
    capture_output=True,
    text=True,
    env=env,
  )
  lines = [l for l in result.stdout.splitlines() if l.startswith("TRL_RESULT ")]
  if result.returncode != 0 or not lines:
    raise RuntimeError(
      f"the TRL run failed (exit {result.returncode}):\n"
      + "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    )
  return json.loads(lines[-1][len("TRL_RESULT ") :])


# --------------------------------------------------------------- our side


def _our_config(data_files, data_dir, args, steps):
  """A psipo_jax training config for the shape, loss and optimiser above."""
  from experiments import lm_ipo_tiny  # pylint: disable=g-import-not-at-top

  config = lm_ipo_tiny.get_config("runlocal,init=")
  config.model.preset = "small"
  config.model.vocab_size = SHAPE["vocab_size"]
  config.model.attention = args.attention
  config.model.scan_layers = not args.unrolled
  if args.remat_policy:
    config.model.remat, config.model.remat_policy = True, args.remat_policy
  config.loss.tau = args.tau
  config.loss.normalize = "mean"  # TRL's "ipo" averages over tokens
  config.optimizer.learning_rate = args.learning_rate
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.total_steps = EPOCHS * steps
  config.input.files = data_files
  config.input.data_dir = data_dir
  config.input.layout = "prompt_response"
  config.input.max_length = MAX_LENGTH
  config.input.max_prompt_length = MAX_PROMPT_LENGTH
  config.input.batch_size = PAIRS_PER_STEP
  config.input.shuffle = False
  return config


def _write_hh_pairs(path: str, n: int, seed: int) -> None:
  """`n` pairs with HH lengths (a seeded sample of the non-empty ones), as
  random lower-case letters: one byte, one token each."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import hh_lengths  # pylint: disable=g-import-not-at-top

  lengths = [p for p in hh_lengths.pairs() if p[1] > 0 and p[2] > 0]
  rng = np.random.default_rng(seed)
  picked = [lengths[i] for i in rng.permutation(len(lengths))[:n]]
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)

  def text(k):
    return letters[rng.integers(0, 26, k)].tobytes().decode("ascii")

  with open(path, "w", encoding="utf-8") as f:
    for i, (p, c, r) in enumerate(picked):
      record = {"id": f"hh-{i}", "prompt": text(p), "chosen": text(c)}
      record["rejected"] = text(r)
      f.write(json.dumps(record) + "\n")


def _trim_to_longest(batch):
  """Padding to the longest row of the batch instead of max_length: the
  padding is on the right and masked, so the columns past the longest row
  change nothing but the work."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  longest = max(
    int(batch[k].sum(axis=1).max())
    for k in batch
    if k.endswith("attention_mask")
  )
  return {
    k: v[:, :longest] if np.ndim(v) == 2 and v.shape[1] == MAX_LENGTH else v
    for k, v in batch.items()
  }


def _trl_pairs_of(batch) -> list[dict]:
  """The token ids of a padded batch's pairs, as TRL's dataset rows."""
  pairs = []
  for i in range(len(batch["chosen_input_ids"])):
    row = {}
    for side in ("chosen", "rejected"):
      ids = batch[f"{side}_input_ids"][i]
      real = batch[f"{side}_attention_mask"][i].astype(bool)
      response = batch[f"{side}_loss_mask"][i].astype(bool)
      prompt = ids[real & ~response].tolist()
      if row.setdefault("prompt_ids", prompt) != prompt:
        raise AssertionError(
          "chosen and rejected rows of a pair differ in prompt"
        )
      row[f"{side}_ids"] = ids[response].tolist()
    pairs.append(row)
  return pairs


def hh_batches(args, tmp: str):
  """(our batches, TRL's pairs in the same order) for the hh workload."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from psipo_jax import data  # pylint: disable=g-import-not-at-top
  from psipo_jax import precompute_reference  # pylint: disable=g-import-not-at-top

  files = os.path.join(tmp, "hh_pairs.jsonl")
  _write_hh_pairs(files, args.hh_steps * PAIRS_PER_STEP, args.seed)
  config = _our_config(
    {"train": files}, os.path.join(tmp, "tfds"), args, args.hh_steps
  )
  padded = list(data.make_preference_iterator(config, "train", num_epochs=1))
  trl_pairs = [p for b in padded for p in _trl_pairs_of(b)]
  if args.reference == "precomputed":
    paths = precompute_reference.precompute(
      config, os.path.join(tmp, "reference"), ["train"]
    )
    config.input.ref_logps_file = paths["train"]
  if args.packing:
    if "packing" not in config.input:
      sys.exit(
        "--packing: input.packing is not in this checkout's input config"
        " (sequence packing is not merged yet)"
      )
    config.input.packing = True
    config.input.share_prompts = args.share_prompts
    config.input.packed_row_length = args.packed_row_length
    batches = list(data.make_preference_iterator(config, "train", num_epochs=1))
  else:
    batches = [
      _trim_to_longest(b)
      for b in data.make_preference_iterator(config, "train", num_epochs=1)
    ]
  ours = sum(
    int(np.sum(b[k])) for b in batches for k in b if k.endswith("loss_mask")
  )
  theirs = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in trl_pairs)
  if ours != theirs:
    raise AssertionError(
      f"response tokens per epoch differ: ours {ours}, TRL's {theirs}"
    )
  return config, batches, trl_pairs


def fixed_batches(args):
  """(our batches, TRL's pairs) of the fixed-length workload."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(args.seed)
  length = FIXED_PROMPT + FIXED_RESPONSE
  batches, trl_pairs = [], []
  for _ in range(args.steps):
    prompt = rng.integers(
      3, SHAPE["vocab_size"], (PAIRS_PER_STEP, FIXED_PROMPT)
    )
    batch = {}
    for side in ("chosen", "rejected"):
      response = rng.integers(
        3, SHAPE["vocab_size"], (PAIRS_PER_STEP, FIXED_RESPONSE)
      )
      batch[f"{side}_input_ids"] = np.concatenate([prompt, response], 1).astype(
        np.int32
      )
      mask = np.zeros((PAIRS_PER_STEP, length), np.int32)
      mask[:, FIXED_PROMPT:] = 1
      batch[f"{side}_loss_mask"] = mask
      batch[f"{side}_attention_mask"] = np.ones_like(mask)
    batches.append(batch)
    trl_pairs += _trl_pairs_of(batch)
  return batches, trl_pairs


def _packed(batch, args):
  """A padded batch's pairs in packed rows (`data.packing.pack_pairs`, the
  data pipeline's packer), with `--share-prompts` each pair's prompt held
  once, in rows of `--packed-row-length` (default max_length) tokens."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from psipo_jax.data import encoding  # pylint: disable=g-import-not-at-top
  from psipo_jax.data import packing  # pylint: disable=g-import-not-at-top

  pairs = []
  for row in _trl_pairs_of(batch):
    ids = [np.asarray(row[k], np.int32) for k in ("prompt_ids", "chosen_ids")]
    ids.append(np.asarray(row["rejected_ids"], np.int32))
    pairs.append(
      encoding.TruncatedPair(*ids, tuple(map(len, ids)), drop_reason=None)
    )
  row_length = args.packed_row_length or MAX_LENGTH
  rows = packing.local_rows(
    np.asarray([pair.full_lengths for pair in pairs]),
    max_length=row_length,
    process_count=1,
    row_multiple=1,
    min_rows=1,
    share_prompts=args.share_prompts,
  )
  return packing.pack_pairs(
    pairs,
    max_length=row_length,
    num_rows=rows,
    pad_id=0,
    pair_offset=0,
    row_offset=0,
    total_pairs=len(pairs),
    share_prompts=args.share_prompts,
  )


def _fill(batches) -> float:
  """Real tokens / token slots of the batches (both sides pad alike)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  real = slots = 0
  for b in batches:
    for k in b:
      # Padded rows mark real tokens in *_attention_mask, packed rows by a
      # segment id other than 0.
      if k.endswith("attention_mask") or k == "packed_segment_ids":
        real, slots = real + int(np.sum(b[k] != 0)), slots + b[k].size
  return real / slots if slots else float("nan")


def run_ours(config, batches, args, *, ref_forward: bool) -> dict:
  """Trains EPOCHS passes over `batches`; times the last one."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from psipo_jax import data_order  # pylint: disable=g-import-not-at-top
  from psipo_jax import models  # pylint: disable=g-import-not-at-top
  from psipo_jax import optimizers  # pylint: disable=g-import-not-at-top
  from psipo_jax.loss_config import LossConfig  # pylint: disable=g-import-not-at-top
  from psipo_jax.train_state import TrainState  # pylint: disable=g-import-not-at-top
  from psipo_jax.train_step import make_train_step, pair_inputs  # pylint: disable=g-import-not-at-top

  init_key, state_key, _ = data_order.run_keys(config.seed)
  model = models.build_model(config.model, rngs=nnx.Rngs(init_key))
  optimizer, schedule = optimizers.make_optimizer(
    config.optimizer, config.total_steps
  )
  on_device = args.reference == "on-device"
  graphdef, state = TrainState.create(
    model,
    optimizer,
    rng=state_key,
    **({} if on_device else {"ref_params": None}),
  )
  if ref_forward and not on_device:  # fixed: the reference's one forward
    score = jax.jit(
      lambda params, b: nnx.merge(graphdef, params)(pair_inputs(b)).logps
    )
    for batch in batches:
      logps = np.asarray(score(state.params, batch))
      batch["ref_chosen_logps"] = logps[:PAIRS_PER_STEP]
      batch["ref_rejected_logps"] = logps[PAIRS_PER_STEP:]
  loss_config = LossConfig.from_config(config.loss)
  step = jax.jit(
    make_train_step(
      graphdef, loss_config, optimizer, learning_rate_fn=schedule
    ),
    donate_argnums=0,
  )
  device_batches = [
    jax.device_put({k: v for k, v in b.items() if k != "id"}) for b in batches
  ]
  tokens = [
    int(sum(np.sum(b[k]) for k in b if k.endswith("loss_mask")))
    for b in batches
  ]
  seconds = []
  for epoch in range(EPOCHS):
    for batch in device_batches:
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      if epoch == EPOCHS - 1:
        seconds.append(time.perf_counter() - start)
      if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(
          f"ours: non-finite loss at step {int(state.step)}"
        )
  return {"step_seconds": seconds, "step_tokens": tokens}


def compare_layouts(args) -> None:
  """Our side only, on the hh pairs: the step's tokens/s with each packed
  layout of the same 16 pairs, one after the other in this process (what
  shared prompts and longer rows buy, under one machine load)."""
  from psipo_jax import data  # pylint: disable=g-import-not-at-top

  args.packing, args.share_prompts, args.packed_row_length = True, False, None
  layouts = [
    ("packed", False, None),
    ("packed, shared prompts", True, None),
    (f"packed, shared prompts, rows of {2 * MAX_LENGTH}", True, 2 * MAX_LENGTH),
  ]
  with tempfile.TemporaryDirectory(prefix="lm_vs_trl_") as tmp:
    config, _, _ = hh_batches(args, tmp)
    for name, share, row_length in layouts:
      config.input.share_prompts = share
      config.input.packed_row_length = row_length
      batches = list(
        data.make_preference_iterator(config, "train", num_epochs=1)
      )
      for _ in range(args.rounds):
        measured = rate(run_ours(config, batches, args, ref_forward=False), 99)
        rows = [len(b["packed_input_ids"]) for b in batches]
        print(
          f"[hh, ours] {name}: rows {rows} of"
          f" {batches[0]['packed_input_ids'].shape[1]},"
          f" {_fill(batches):.0%} of slots real:"
          f" {measured[0]:.1f} response tokens/s ({measured[1]:.2f} s)",
          flush=True,
        )


# ---------------------------------------------------------------- report


def rate(result: dict, timed_steps: int) -> tuple[float, float, int]:
  """(tokens/s, seconds, tokens) over the last `timed_steps` steps."""
  seconds = sum(result["step_seconds"][-timed_steps:])
  tokens = sum(result["step_tokens"][-timed_steps:])
  return tokens / seconds, seconds, tokens


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--workload", default="fixed,hh")
  parser.add_argument(
    "--steps",
    type=int,
    default=4,
    help="fixed: steps per epoch (2 epochs, the second timed)",
  )
  parser.add_argument(
    "--hh-steps", type=int, default=2, help="hh: steps per epoch"
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="repeat both sides; the best round of each is reported",
  )
  parser.add_argument(
    "--packing",
    action="store_true",
    help="hh, our side: input.packing=True instead of padding to the longest",
  )
  parser.add_argument(
    "--share-prompts",
    action="store_true",
    help="with --packing, our side: input.share_prompts=True (each pair's"
    " prompt held once in its row), on the hh and the fixed work",
  )
  parser.add_argument(
    "--packed-row-length",
    type=int,
    default=None,
    help="with --packing, our side: input.packed_row_length (default"
    " max_length)",
  )
  parser.add_argument(
    "--reference", choices=("precomputed", "on-device"), default="precomputed"
  )
  parser.add_argument(
    "--attention",
    default="xla",
    help="our side's model.attention (xla, blocked, cudnn)",
  )
  parser.add_argument(
    "--unrolled",
    action="store_true",
    help="our side's layers one after another: model.scan_layers=False",
  )
  parser.add_argument(
    "--remat-policy",
    default=None,
    help="our side's model.remat=True with this model.remat_policy"
    " (e.g. dots_saveable)",
  )
  parser.add_argument(
    "--compare-layouts",
    action="store_true",
    help="no TRL: our hh step with packed, shared-prompt and longer rows",
  )
  parser.add_argument("--learning-rate", type=float, default=1e-5)
  parser.add_argument("--tau", type=float, default=0.1)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--venv", default=DEFAULT_VENV)
  parser.add_argument("--trl-version", default=TRL_VERSION)
  parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.trl_worker:
    trl_worker(args.trl_worker)
    return 0
  workloads = args.workload.split(",")
  unknown = set(workloads) - {"fixed", "hh"}
  if unknown:
    parser.error(f"--workload: unknown {sorted(unknown)}; choose fixed, hh")
  if args.share_prompts and not args.packing:
    parser.error("--share-prompts shares prompts in packed rows: add --packing")
  if min(args.steps, args.hh_steps, args.rounds) < 1:
    parser.error("--steps, --hh-steps and --rounds must be at least 1")
  python = (
    None if args.compare_layouts else ensure_venv(args.venv, args.trl_version)
  )

  # 2 threads for XLA too, set before JAX starts.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=true"
    + f" intra_op_parallelism_threads={args.threads}"
  ).strip()
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  from psipo_jax import host_allocator  # pylint: disable=g-import-not-at-top
  from psipo_jax.models import transformer  # pylint: disable=g-import-not-at-top

  params = transformer.param_count(
    transformer.config_from_model_block(
      {"name": "transformer", "preset": "small"}
    )
  )
  print(
    f"Model: Llama-style, V {SHAPE['vocab_size']}, d {SHAPE['embed_dim']},"
    f" L {SHAPE['num_layers']}, H {SHAPE['num_heads']}, K"
    f" {SHAPE['num_kv_heads']}, F {SHAPE['mlp_dim']}, untied,"
    f" {params / 1e6:.2f}M parameters; float32, CPU, {args.threads} threads"
    f" (os.cpu_count()={os.cpu_count()}); IPO τ=β={args.tau}, AdamW lr"
    f" {args.learning_rate}, clip 1.0; {PAIRS_PER_STEP} pairs/step;"
    " 2 epochs over the same pairs, the second timed. Host allocator (both"
    f" sides): {host_allocator.describe()}."
  )
  if args.compare_layouts:
    compare_layouts(args)
    return 0
  rows = []
  with tempfile.TemporaryDirectory(prefix="lm_vs_trl_") as tmp:
    for name in workloads:
      steps = args.steps if name == "fixed" else args.hh_steps
      if name == "fixed":
        batches, trl_pairs = fixed_batches(args)
        config = _our_config({"train": "unused"}, tmp, args, steps)
        layout = f"{FIXED_PROMPT} + {FIXED_RESPONSE} tokens, no padding"
        if args.share_prompts:  # the same pairs, each prompt held once
          batches = [_packed(b, args) for b in batches]
          layout += ", packed with shared prompts (input.share_prompts)"
      else:
        config, batches, trl_pairs = hh_batches(args, tmp)
        layout = (
          "packed rows (input.packing=True"
          + (", input.share_prompts=True" if args.share_prompts else "")
          + (
            f", input.packed_row_length={args.packed_row_length})"
            if args.packed_row_length
            else ")"
          )
          if args.packing
          else "padded to the longest row of each batch"
        )
      layout += (
        f"; {_fill(batches):.0%} of token slots real; our attention"
        f" {args.attention!r}, layers "
        + ("unrolled" if args.unrolled else "scanned")
        + (
          f", each rematerialised ({args.remat_policy})"
          if args.remat_policy
          else ""
        )
      )
      spec = dict(
        name=name,
        pairs=trl_pairs,
        shape=SHAPE,
        tau=args.tau,
        learning_rate=args.learning_rate,
        pairs_per_step=PAIRS_PER_STEP,
        epochs=EPOCHS,
        max_length=MAX_LENGTH,
        reference=args.reference,
        threads=args.threads,
        seed=args.seed,
        output_dir=os.path.join(tmp, f"trl_out_{name}"),
      )
      best = {}
      for _ in range(args.rounds):  # alternating, on a machine others share
        ours = run_ours(config, batches, args, ref_forward=name == "fixed")
        theirs = run_trl(python, spec, tmp)
        if theirs["step_tokens"][-steps:] != ours["step_tokens"]:
          raise AssertionError(
            f"{name}: the two sides' batches differ in response tokens:"
            f" ours {ours['step_tokens']}, TRL"
            f" {theirs['step_tokens'][-steps:]}"
          )
        for side, result in (("ours", ours), ("trl", theirs)):
          measured = rate(result, steps)
          if side not in best or measured[0] > best[side][0]:
            best[side] = measured
        versions = theirs["versions"]
        attention = theirs["attn_implementation"]
      rows.append((name, steps, layout, best))

  print(
    f"Ours: psipo_jax, jax {jax.__version__}: train_step.make_train_step"
    " jitted; LM head on response positions only (logprobs='chunked');"
    f" reference {args.reference}"
    + (
      " (fixed: one jitted forward before training; hh: python -m"
      " psipo_jax.precompute_reference's job), in the batch."
      if args.reference == "precomputed"
      else ": its forward every step."
    )
  )
  print(
    f"TRL {versions['trl']} (torch {versions['torch']}, transformers"
    f" {versions['transformers']}, attention"
    f" {attention}): DPOTrainer(loss_type='ipo'),"
    " fused LM head on completion positions (TRL's default),"
    + (
      " precompute_ref_log_probs=True,"
      if args.reference == "precomputed"
      else " reference forward every step,"
    )
    + " padding to the longest (padding_free=True is disabled in TRL 1.16:"
    " it falls back to padding)."
  )
  for name, steps, layout, best in rows:
    (ours_rate, ours_s, tokens), (trl_rate, trl_s, _) = (
      best["ours"],
      best["trl"],
    )
    print(
      f"[{name}] {steps} timed steps, {tokens} response tokens"
      f" (best of {args.rounds} round(s)); ours: {layout}\n"
      f"  psipo_jax : {ours_rate:9.1f} response tokens/s ({ours_s:.2f} s)\n"
      f"  TRL       : {trl_rate:9.1f} response tokens/s ({trl_s:.2f} s)\n"
      f"  ratio     : {ours_rate / trl_rate:.2f}x"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
