"""Test setup: fake 8 CPU devices so sharding tests run on a laptop (must precede `import jax`)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SAMPLE_DATA = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "data"


@pytest.fixture(scope="session")
def sample_data_dir():
    """experiments/data: the small public samples vendored into the repo (HH-RLHF harmless-base test
    split, MIT; see its LICENSE)."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """JAX persistent compilation cache in a temp dir, shared by the trainer test modules, the script
    subprocesses they start (pass `script_env(...)`) and the pytest-xdist workers of one run: a
    program compiled once (same HLO, devices and options) is loaded, not recompiled, by later runs.
    Restored at the end of the session."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if os.environ.get("PYTEST_XDIST_WORKER"):  # ./test.sh's workers share one cache (their common temp root)
        path = tmp_path_factory.getbasetemp().parent / "jax_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("jax_cache")
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    cc.reset_cache()


@pytest.fixture(scope="session")
def script_env(compilation_cache):
    """`script_env(devices)`: environment for an experiments/train_*.py subprocess with `devices` fake
    CPU devices, sharing the session's compilation cache."""
    def env(devices: int) -> dict:
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return env


MULTIPROCESS = os.environ.get("RLHF_JAX_MULTIPROCESS_TEST") == "1"
multiprocess_test = pytest.mark.skipif(
    not MULTIPROCESS, reason="extra JAX processes compile their own programs (~1 min each on 2 shared cores); "
                             "run with RLHF_JAX_MULTIPROCESS_TEST=1")


@pytest.fixture(scope="session")
def run_processes(script_env):
    """`run_processes(args, workdir, n)`: runs experiments/train_ppo.py as `n` local JAX processes (one
    CPU device each, gloo collectives, `--config.distributed.*` as in train_ppo.py's docstring) on one
    coordinator port; fails with a process's stderr when one exits non-zero."""
    import socket
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "train_ppo.py"

    def run(args: list[str], workdir: pathlib.Path, n: int = 2) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**script_env(1), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
        procs = [subprocess.Popen(
            [sys.executable, str(script), f"--workdir={workdir}", *args, "--config.distributed.initialize=True",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             f"--config.distributed.num_processes={n}", f"--config.distributed.process_id={pid}"],
            cwd=script.parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in range(n)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
    return run


@pytest.fixture
def sigterm_after_step(monkeypatch):
    """`sigterm_after_step(k)`: the trainer process sends itself SIGTERM right after it logs step k
    (deterministic stand-in for a preemption notice arriving mid-run; the loop's guard must then
    finish the next step, checkpoint it and return `preempted=True`)."""
    import signal

    from rlhf_jax import metrics

    def arm(step: int) -> None:
        write, sent = metrics.MetricWriter.write, []

        def write_then_signal(self, at_step, row):
            out = write(self, at_step, row)
            if at_step == step and not sent:  # once: a resumed run is not interrupted again
                sent.append(at_step)
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        monkeypatch.setattr(metrics.MetricWriter, "write", write_then_signal)
    return arm


@pytest.fixture(scope="session")
def hh_tokenizer(sample_data_dir, tmp_path_factory):
    """A 512-entry byte-level BPE (any text encodes, no unknowns) trained on 300 chosen transcripts of
    the vendored HH-RLHF sample, saved as a local HF tokenizer directory; returns its path."""
    import gzip
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("hh_tokenizer")
    with gzip.open(sample_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(300), lines)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def word_rankings():
    """`write(path, examples, best_first, seed)`: a rankings JSONL whose K responses are the words of
    `best_first` in a random order per prompt, ranked best first (trivially separable preferences)."""
    import json

    import numpy as np

    def write(path, examples, best_first, seed):
        rng = np.random.default_rng(seed)
        with open(path, "w") as f:
            for example in examples:
                responses = list(rng.permutation(best_first))
                ranking = [responses.index(word) for word in best_first]
                f.write(json.dumps({"prompt": example.prompt, "responses": responses, "ranking": ranking}) + "\n")
    return write


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory, word_rankings):
    """What the LoRA stage tests adapt: `train.jsonl` (64 built-in task demonstrations), `rankings.jsonl`
    (32 prompts, responses "a" > "b" > "c"), the task's `tokenizer`, and `base`: a random tiny
    Llama-style model saved as a Hugging Face directory (the frozen base). Returns the directory."""
    import jax

    from rlhf_jax import loading, tasks
    from rlhf_jax.models import Transformer, TransformerConfig, init_params, save_pretrained

    root = tmp_path_factory.mktemp("lora_files")
    tasks.write_demonstrations(root / "train.jsonl", tasks.sample_examples(64, seed=0), seed=0)
    word_rankings(root / "rankings.jsonl", tasks.sample_examples(32, seed=0), ("a", "b", "c"), seed=0)
    tasks.save_tokenizer(root / "tokenizer")
    vocab = len(loading.load_tokenizer(str(root / "tokenizer")))
    base = Transformer(TransformerConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64))
    save_pretrained(base, init_params(base, jax.random.PRNGKey(7)), root / "base")
    return root


@pytest.fixture(scope="session")
def ranking_files(tmp_path_factory, word_rankings):
    """`make(name, best_first) -> directory` with `train.jsonl` (64 built-in task prompts) and
    `eval.jsonl` (16 held-out prompts) from `word_rankings`, and the task's `tokenizer`."""
    from rlhf_jax import tasks

    def make(name, best_first):
        root = tmp_path_factory.mktemp(name)
        word_rankings(root / "train.jsonl", tasks.sample_examples(64, seed=0), best_first, seed=0)
        word_rankings(root / "eval.jsonl", tasks.sample_examples(16, seed=0, split="heldout"), best_first, seed=1)
        tasks.save_tokenizer(root / "tokenizer")
        return root
    return make


def ranking_data_that_does_not_fit(files) -> list:
    """(config overrides, expected error start) for an RM / DPO stage on `ranking_files`' data: a batch
    larger than the 64 ranked prompts (with config.num_steps set, and with 0 = epochs) and a tokenizer
    with more ids than the model's vocabulary."""
    train, tokenizer = files / "train.jsonl", files / "tokenizer"
    return [({"batch_size": 72}, f"config.batch_size=72 is larger than the 64 ranked prompts in {train}: an epoch "
                                  "would have no step; lower config.batch_size (to at most 64) or add data"),
            ({"batch_size": 72, "num_steps": 0}, f"config.batch_size=72 is larger than the 64 ranked prompts in "
                                                  f"{train}: an epoch would have no step"),
            ({"model.vocab_size": 40}, f"config.data.tokenizer='{tokenizer}': the tokenizer has 120 tokens (ids up "
                                        "to 119) but config.model.vocab_size=40; set config.model.vocab_size to 0 (= "
                                        "the tokenizer's size) or at least 120")]


def assert_one_line_errors_before_jit(train, cases, tmp_path, monkeypatch) -> None:
    """`train(overrides, workdir)` raises ValueError starting with each case's message before any
    `jax.jit` (patched to fail) and writes no checkpoint."""
    import jax

    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    for i, (override, message) in enumerate(cases):
        with pytest.raises(ValueError) as error:
            train(override, str(tmp_path / f"run{i}"))
        assert str(error.value).startswith(message)
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()
