"""Host memory of model loading: each rank's peak resident set while the actor (`create_hf_model`)
or stage 3's reward model (`create_critic_model(rlhf_training=True)`) loads, before and after the
change that loads in the engine's dtype and reads the reward checkpoint one tensor at a time.

    python -m benchmarks.load_memory [--quick] [--out benchmarks/output/load_memory]
                                     [--before_rev REV | --before_root DIR]

Models: a random OPT-family model (default the shape of OPT-350m: hidden 1024, 24 layers, FFN
4096, embedding projected to 512, vocabulary 50272; 331M parameters), written once under --cache
as an actor checkpoint and a stage-2 reward checkpoint, each in fp32 and in bf16, with the tiny
models' tokenizer (utils/model/tiny_models.py). `--quick`: a 3M-parameter model and the bf16
engine + fp32 checkpoint rows only, for tests (about 2 minutes on 2 cores).

Runs: one `deepspeed --num_gpus 2` launch (DS_ACCELERATOR=cpu, gloo) of this file's worker per row
and code, as stage 3 builds its models: the actor with its train config (ZeRO 2 or 3), the reward
model with its frozen config (ZeRO 2 runs at 0, as stage 3 runs it; only ZeRO 3 changes the load).
Engine precisions and checkpoints: fp32 engine + fp32 checkpoint, bf16 engine + fp32 checkpoint,
bf16 engine + bf16 checkpoint (bf16 runs on the CPU under DeepSpeed), and for the reward model a
bf16 checkpoint in the original's layout too (one pytorch_model.bin: "bf16 .bin"). "before" is
the utils/ of --before_rev (default the commit before the change, extracted with `git archive`:
no worktree, no change to the repository) or of the checkout --before_root; "after" is this
checkout.

Numbers, per rank, in MiB, over two phases: "load" (create_hf_model / create_critic_model) and
"load + init" (then deepspeed.initialize as a frozen engine of the same precision, ZeRO 3 or 0, no
optimizer: DeepSpeed's cast to bf16 of an fp32-loaded model happens there). peak RSS: VmHWM since
the start of the load (reset with /proc/self/clear_refs); file pages of a memory-mapped checkpoint
count in it, though the ranks share them and the kernel can drop them. anon rise: the peak of
RssAnon (sampled every 0.5 ms: a lower bound) above its value before the load: private memory,
what an OOM kill counts. "model MiB" is the whole model in the engine's dtype; each rank holds it
whole below ZeRO 3. Writes load_memory.md and load_memory.json under --out; RESULTS.md is not
touched.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "output", "load_memory")
DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "remax_load_memory")
# The last commit whose create_hf_model loaded fp32 on every rank and whose reward models were
# read whole (issue 19, parts 2a and 3).
BEFORE_REV = "a24ba67b5c781535ecf9907aef3f4cc9cecd0b94"
RANKS = 2
# (engine precision, checkpoint dtype)
PRECISIONS = (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))
QUICK_PRECISIONS = (("bf16", "fp32"),)
# The reward model also as the original's step 2 wrote it: pytorch_model.bin, bf16.
ORIGINAL_LAYOUT = "bf16 .bin"
MODELS = ("actor", "reward")
ZERO_STAGES = (2, 3)
FULL_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                  word_embed_proj_dim=512, vocab_size=50272, max_position_embeddings=2048)
QUICK_SHAPE = dict(hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
                   word_embed_proj_dim=128, vocab_size=16384, max_position_embeddings=512)
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


# ----------------------------------------------------------------------------- models

def shape_name(shape):
    return (f"opt-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-p"
            f"{shape['word_embed_proj_dim']}-v{shape['vocab_size']}")


def build_checkpoints(cache, shape, seed=1234):
    """{(kind, dtype): directory} for kind in actor/reward and dtype in fp32/bf16, built once."""
    root = os.path.join(cache, shape_name(shape))
    dirs = {(kind, dtype): os.path.join(root, f"{kind}-{dtype}")
            for kind in MODELS for dtype in ("fp32", "bf16")}
    dirs[("reward", ORIGINAL_LAYOUT)] = os.path.join(root, "reward-bf16-original")
    marker = os.path.join(root, "built-v2.json")   # v2: with the original-layout reward model
    if os.path.exists(marker):
        return dirs
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from utils.model.model_utils import save_reward_model
    from utils.model.reward_model import RewardModel
    from utils.model.tiny_models import build_tiny_checkpoint

    shutil.rmtree(root, ignore_errors=True)
    template = build_tiny_checkpoint("opt", os.path.join(root, "template"), vocab_size=1024)
    config = AutoConfig.from_pretrained(template)
    config.update(shape)
    tokenizer = AutoTokenizer.from_pretrained(template)
    torch.manual_seed(seed)
    actor = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        actor.to(dtype).save_pretrained(dirs[("actor", dtype_name)])
        tokenizer.save_pretrained(dirs[("actor", dtype_name)])
    del actor
    torch.manual_seed(seed + 1)
    reward = RewardModel(AutoModel.from_config(config, dtype=torch.float32), tokenizer.eos_token_id,
                         num_padding_at_beginning=1)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        reward.to(dtype)
        save_reward_model(reward, tokenizer, dirs[("reward", dtype_name)], 1, rank=0)
    original = dirs[("reward", ORIGINAL_LAYOUT)]       # the original's step-2 output: one pickle
    os.makedirs(original)
    torch.save(reward.state_dict(), os.path.join(original, "pytorch_model.bin"))
    reward.rwtranrsformer.config.save_pretrained(original)
    tokenizer.save_pretrained(original)
    shutil.rmtree(template)
    with open(marker, "w") as f:
        json.dump(shape, f)
    return dirs


def checkpoint_mib(directory):
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.endswith((".safetensors", ".bin"))) / 2 ** 20


# ----------------------------------------------------------------------------- the worker (one rank)

def read_status():
    """Fields of /proc/self/status in MiB. (Its own reader, not utils/perf.py's: the worker runs
    the "before" code's utils/, which must not need anything newer.)"""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                fields[key] = int(value.split()[0]) / 1024
    return fields


class AnonSampler(threading.Thread):
    """The largest RssAnon seen, polled every `interval` s; `mark()` returns the peak so far."""

    def __init__(self, interval=0.0005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, 0.0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, read_status()["RssAnon"])
            time.sleep(self.interval)

    def mark(self):
        self.peak = max(self.peak, read_status()["RssAnon"])
        return self.peak

    def stop(self):
        self._done.set()
        self.join()
        return self.mark()


def _import_model_classes(checkpoint):
    import safetensors.torch  # noqa: F401
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401
    from transformers.models.auto import modeling_auto

    config_class = type(AutoConfig.from_pretrained(checkpoint))
    return (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[config_class],
            modeling_auto.MODEL_MAPPING[config_class])


def phase(floor, sampler, seconds):
    """The numbers of one phase (from the reset peak to now), in MiB."""
    now = read_status()
    peak_anon = sampler.mark()
    return {"peak_rss_mib": now["VmHWM"], "rise_mib": now["VmHWM"] - floor["VmRSS"],
            "peak_anon_mib": peak_anon, "anon_rise_mib": peak_anon - floor["RssAnon"],
            "status": now, "seconds": seconds}


def worker(opts):
    """One rank of one row: load the model as stage 3 does (the "load" phase), then hand it to
    deepspeed.initialize as a frozen engine of the same precision and ZeRO 3 or 0 ("init": the
    load and DeepSpeed's cast or partitioning, no optimizer); writes rank<r>.json."""
    sys.path.insert(0, opts.code_root)       # the code measured: before or after
    sys.setswitchinterval(0.0005)             # let the sampler in between the loader's steps
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from utils.ds_utils import get_eval_ds_config, get_train_ds_config, set_batch_sizes
    from utils.model.model_utils import create_critic_model, create_hf_model, load_hf_tokenizer
    from utils.utils import init_distributed

    _, rank, world = init_distributed(opts.local_rank)   # unlinks DeepSpeed's /dev/shm buffer
    stage = 3 if opts.zero == 3 else 0        # frozen_model_stage: a frozen model runs 2 as 0
    frozen_config = set_batch_sizes(get_eval_ds_config(False, stage=stage, precision=opts.precision),
                                    1, world, 1)
    if opts.model == "actor":
        config = set_batch_sizes(get_train_ds_config(False, stage=opts.zero,
                                                     precision=opts.precision), 1, world, 1)
        load = lambda: create_hf_model(AutoModelForCausalLM, opts.checkpoint, tokenizer,  # noqa: E731
                                       config)
    else:
        config = frozen_config
        load = lambda: create_critic_model(opts.checkpoint, tokenizer, config, 1,  # noqa: E731
                                           rlhf_training=True)
    tokenizer = load_hf_tokenizer(opts.checkpoint)
    _import_model_classes(opts.checkpoint)   # one-time imports: the floor's, not the load's
    dist.barrier()
    floor = read_status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # VmHWM := VmRSS: the peak from here on
    sampler = AnonSampler()
    sampler.start()
    start = time.time()
    model = load()
    loaded = phase(floor, sampler, time.time() - start)
    params = list(model.parameters())
    held = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
               for p in params)
    result = {"rank": rank, "floor": floor, "load": loaded, "held_mib": held / 2 ** 20,
              "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
              "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
              "partitioned": any(hasattr(p, "ds_id") for p in params)}
    start = time.time()
    engine, *_ = deepspeed.initialize(model=model, config=frozen_config)
    result["init"] = phase(floor, sampler, time.time() - start)
    sampler.stop()
    result["engine_dtypes"] = sorted({str(p.dtype).replace("torch.", "")
                                      for p in engine.module.parameters()})
    with open(os.path.join(opts.result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()


# ----------------------------------------------------------------------------- the parent

def before_code(opts, workdir):
    """The directory whose utils/ is the "before" code."""
    if opts.before_root:
        return os.path.abspath(opts.before_root)
    target = os.path.join(workdir, "before")
    os.makedirs(target, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", opts.before_rev, "utils"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def run_row(code_root, model, zero, precision, checkpoint, run_dir, mmap_threshold=None):
    from demo.stages import free_port, launcher_env

    os.makedirs(run_dir, exist_ok=True)
    env = launcher_env(RANKS)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(RANKS),
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker",
           "--code_root", code_root, "--model", model, "--zero", str(zero), "--precision",
           precision, "--checkpoint", checkpoint, "--result_dir", run_dir]
    log_path = os.path.join(run_dir, "log.txt")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=1200)
    ranks = []
    for rank in range(RANKS):
        path = os.path.join(run_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    if proc.returncode != 0 or len(ranks) != RANKS:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[-12:])} failed (exit {proc.returncode}):\n{tail}")
    return ranks


def rows_to_run(opts):
    rows = []
    for model in opts.models:
        precisions = QUICK_PRECISIONS if opts.quick else PRECISIONS
        if model == "reward" and not opts.quick:
            precisions += (("bf16", ORIGINAL_LAYOUT),)
        rows += [(model, zero, precision, checkpoint) for zero in opts.zero_stages
                 for precision, checkpoint in precisions]
    return rows


def per_ranks(ranks, phase_name, key):
    return " / ".join(format_mib(r[phase_name][key]) for r in ranks)


def format_mib(value):
    return str(int(round(value)))


COLUMNS = (("load", "peak_rss_mib", "load: peak RSS"),
           ("load", "anon_rise_mib", "load: anon rise"),
           ("init", "peak_rss_mib", "load + init: peak RSS"),
           ("init", "anon_rise_mib", "load + init: anon rise"))


def markdown(results, shape_text):
    lines = ["| model | ZeRO | engine | checkpoint | model MiB | code | dtype loaded | "
             + " | ".join(f"{title} r0 / r1" for _, _, title in COLUMNS) + " |",
             "|---|---:|---|---|---:|---|---|" + "---:|" * len(COLUMNS)]
    for row in results:
        for code in ("before", "after"):
            ranks = row[code]
            cells = [per_ranks(ranks, phase_name, key) for phase_name, key, _ in COLUMNS]
            lines.append(f"| {row['model']} | {row['zero']} | {row['precision']} | "
                         f"{row['checkpoint']} | {format_mib(row['model_mib'])} | {code} | "
                         f"{'+'.join(ranks[0]['dtypes'])} | " + " | ".join(cells) + " |")
    floors = [r["floor"]["VmRSS"] for row in results for code in ("before", "after")
              for r in row[code]]
    lines += ["", f"{shape_text}. Per rank (r0 / r1), MiB. load: `create_hf_model` (actor, train "
                  "config) or `create_critic_model(rlhf_training=True)` (reward model, frozen "
                  "config); load + init: then `deepspeed.initialize` as a frozen engine of the same "
                  "precision (ZeRO 3, or 0 for 2; no optimizer): DeepSpeed's cast to bf16, its "
                  "partitioning. peak RSS: VmHWM from the start of the load (file pages of a "
                  "memory-mapped checkpoint count in it; the kernel can drop them, and the ranks "
                  "share them); anon rise: the sampled peak of RssAnon above its value before "
                  "the load (private memory, what an OOM kill counts). The floor before the load "
                  f"(imports, runtime) was {min(floors):.0f}-{max(floors):.0f} MiB. model MiB: "
                  "the whole model in the engine's dtype. The reward model at ZeRO 2 runs at 0 "
                  "(frozen)."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="A 3M-parameter model, bf16 engine + fp32 checkpoint rows only: "
                             "for tests (the differences drown in the floor).")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="Where the random checkpoints are written once (default under /tmp).")
    parser.add_argument("--before_rev", default=BEFORE_REV,
                        help="The git revision whose utils/ is the 'before' code.")
    parser.add_argument("--before_root", default=None,
                        help="A checkout whose utils/ is the 'before' code (instead of --before_rev).")
    parser.add_argument("--mmap_threshold", type=int, default=None,
                        help="Set MALLOC_MMAP_THRESHOLD_ for the ranks (e.g. 131072): glibc then "
                             "maps every allocation of at least that many bytes and returns it "
                             "when freed, so the numbers show what the code holds, not the freed "
                             "ZeRO-3 gather buffers glibc's heap keeps (the default: glibc's "
                             "own threshold, what a run gets).")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--zero_stages", nargs="+", type=int, default=list(ZERO_STAGES),
                        choices=ZERO_STAGES)
    # the worker's own flags (one rank of one row, started by the deepspeed launcher)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code_root", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result_dir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if opts.worker:
        return worker(opts)
    from benchmarks.machine import describe_machine, machine_line

    shape = QUICK_SHAPE if opts.quick else FULL_SHAPE
    os.makedirs(opts.out, exist_ok=True)
    machine = describe_machine("cpu")
    print(f"building the checkpoints under {opts.cache} ...", flush=True)
    dirs = build_checkpoints(opts.cache, shape)
    with tempfile.TemporaryDirectory(prefix="load_memory_") as workdir:
        codes = {"before": before_code(opts, workdir), "after": ROOT}
        results = []
        todo = rows_to_run(opts)
        for index, (model, zero, precision, checkpoint) in enumerate(todo):
            row = {"model": model, "zero": zero, "precision": precision, "checkpoint": checkpoint}
            for code, code_root in codes.items():   # before then after, row by row
                print(f"[{index + 1}/{len(todo)}] {model} ZeRO {zero}, {precision} engine, "
                      f"{checkpoint} checkpoint: {code}", flush=True)
                run_dir = os.path.join(opts.out, "runs", f"{model}-z{zero}-{precision}-"
                                       f"{checkpoint.replace(' .', '-')}-{code}")
                row[code] = run_row(code_root, model, zero, precision,
                                    dirs[(model, checkpoint)], run_dir, opts.mmap_threshold)
            parameters = row["after"][0]["parameters"]
            row["model_mib"] = parameters * (4 if precision == "fp32" else 2) / 2 ** 20
            row["checkpoint_mib"] = checkpoint_mib(dirs[(model, checkpoint)])
            results.append(row)
    parameters = results[0]["after"][0]["parameters"] if results else 0
    shape_text = (f"{shape_name(shape)}: a random OPT-family model of {parameters / 1e6:.1f}M "
                  f"parameters (the reward model without the LM head), {RANKS} ranks on the CPU"
                  + (f", MALLOC_MMAP_THRESHOLD_={opts.mmap_threshold}" if opts.mmap_threshold
                     else ""))
    text = markdown(results, shape_text)
    report = f"{text}\n\nMachine: {machine_line(machine)}\n"
    with open(os.path.join(opts.out, "load_memory.md"), "w") as f:
        f.write(report)
    with open(os.path.join(opts.out, "load_memory.json"), "w") as f:
        json.dump({"shape": shape, "machine": machine, "before": opts.before_root or opts.before_rev,
                   "mmap_threshold": opts.mmap_threshold, "rows": results}, f, indent=1)
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
