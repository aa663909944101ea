"""Shared test helpers: tiny models and data built in code, a word-level tokenizer, the float64 patch."""

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpg.exact import float64_llama  # noqa: F401

# The device of the exactness tests: the CPU here and in CI; DPG_TEST_DEVICE=cuda runs them unchanged on a GPU.
DEVICE = os.environ.get("DPG_TEST_DEVICE", "cpu")
# experiments/pattern-67.yaml at the lighter settings it had before PK1 became its recipe (RESULTS-reproduce §7l):
# the run ids stored before then, and a light base for tests of the benchmarks
PATTERN_67_BEFORE_PK1 = ["rollouts.n_rollouts=4", "rollouts.max_new_tokens=16", "sft.max_len=24", "sft.lr=0.3",
                         "policy.epochs=1", "policy.kl_coef=0.0", "target.eval_fresh=0", "target.eval_fresh_every=1"]

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "from", "home", "and", "then",
         "came", "back"]


def make_tokenizer(pad_token="<pad>"):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token=pad_token)


@pytest.fixture(autouse=True)
def _float64_clean():
    """Llama's norm and softmax stay in the input dtype, so float64 checks are exact."""
    with float64_llama():
        yield


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (offline GGUF, fp32) and its tokenizer, loaded once per session."""
    from dpg.models import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto) on 127.0.0.1: yields storage_options for s3fs; stopped at the end."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="dpg-test")
    yield {"client_kwargs": {"endpoint_url": endpoint}}  # credentials: the environment, as users set them
    server.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole test session (PITFALLS: ~10 s to start)."""
    import os
    import tempfile

    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dpg-prefect-"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory):
    """A tiny random Llama generator + word-level tokenizer saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-generator")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=None, eos_token_id=1, pad_token_id=0,
                                         attn_implementation="eager"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine thread spinning costs ~50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
