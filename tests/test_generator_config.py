"""The generator backends' config: generate.backend, the [vllm] and [openai] sections, the
migration of the vLLM options that used to sit under [generate], and the fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import orjson
import pytest

from ragserve.config import PROMPT_TEMPLATE_VERSION, RAGConfig
from ragserve.errors import ConfigError

OPENAI = {"generate": {"backend": "openai"}, "openai": {"urls": ["http://gpu-1:8000"]}}


def test_defaults_are_the_in_process_vllm_backend():
    cfg = RAGConfig()
    assert cfg.generate.backend == "vllm" and cfg.vllm.dtype == "bfloat16" and cfg.vllm.kv_cache_gib == 2.0
    assert cfg.openai.urls == () and cfg.openai.tokenizer == "" and cfg.openai.retries == 2
    assert not hasattr(cfg.generate, "dtype")  # what only vLLM reads is no longer shared


def test_sections_load_from_toml_then_env(tmp_path):
    p = tmp_path / "ragserve.toml"
    p.write_text('[generate]\nbackend = "openai"\nmax_tokens = 40\n'
                 '[openai]\nurls = ["http://gpu-1:8000", "http://gpu-2:8000/v1"]\nmodel = "smol"\n'
                 'tokenizer = "server"\nretries = 1\nread_timeout_s = 30\n'
                 '[vllm]\nkv_cache_gib = 3\nenforce_eager = false\n')
    cfg = RAGConfig.load(p, env={})
    o = cfg.openai
    assert cfg.generate.backend == "openai" and cfg.generate.max_tokens == 40
    assert o.urls == ("http://gpu-1:8000", "http://gpu-2:8000/v1") and o.model == "smol"
    assert (o.tokenizer, o.retries, o.read_timeout_s) == ("server", 1, 30.0)
    assert cfg.vllm.kv_cache_gib == 3.0 and cfg.vllm.enforce_eager is False
    env = {"RAGSERVE_OPENAI_URLS": "http://a:1, http://b:2", "RAGSERVE_OPENAI_FAILURES_TO_EJECT": "5",
           "RAGSERVE_OPENAI_API_KEY": "secret-key", "RAGSERVE_VLLM_MAX_NUM_SEQS": "8"}
    cfg = RAGConfig.load(p, env=env)
    assert cfg.openai.urls == ("http://a:1", "http://b:2") and cfg.openai.failures_to_eject == 5
    assert cfg.openai.api_key == "secret-key" and "secret-key" not in repr(cfg)
    assert cfg.vllm.max_num_seqs == 8 and cfg.openai.model == "smol"


def test_old_vllm_keys_under_generate_still_load_with_a_warning(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text('[generate]\nmax_tokens = 50\ndtype = "float16"\nkv_cache_gib = 3\n'
                 'uniproc_executor = false\n')
    with pytest.warns(FutureWarning, match=r"\[generate\] dtype, kv_cache_gib, uniproc_executor moved to the "
                                           r"\[vllm\] section"):
        cfg = RAGConfig.load(p, env={})
    assert (cfg.vllm.dtype, cfg.vllm.kv_cache_gib, cfg.vllm.uniproc_executor) == ("float16", 3.0, False)
    assert cfg.generate.max_tokens == 50
    with pytest.warns(FutureWarning):  # an old env var still overrides the file
        cfg = RAGConfig.load(p, env={"RAGSERVE_GENERATE_KV_CACHE_GIB": "1"})
    assert cfg.vllm.kv_cache_gib == 1.0
    with pytest.warns(FutureWarning):
        assert RAGConfig().replace(generate={"max_num_seqs": 4}).vllm.max_num_seqs == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        assert RAGConfig().replace(vllm={"max_num_seqs": 4}).vllm.max_num_seqs == 4


def test_an_old_key_that_contradicts_the_new_one_is_refused():
    with pytest.raises(ConfigError, match="moved to vllm.dtype") as e:
        RAGConfig().replace(generate={"dtype": "float16"}, vllm={"dtype": "bfloat16"})
    assert e.value.field == "generate.dtype"
    with pytest.warns(FutureWarning):  # the same value in both places is fine
        same = RAGConfig().replace(generate={"dtype": "float16"}, vllm={"dtype": "float16"})
    assert same.vllm.dtype == "float16"


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"generate": {"backend": "tgi"}}, "generate.backend"),
        ({"generate": {"backend": "openai"}}, "openai.urls"),
        ({"openai": {"urls": ["gpu-1:8000"]}}, "openai.urls"),
        ({"openai": {"urls": ["http://a:1", "http://a:1/v1/"]}}, "openai.urls"),
        ({"openai": {"urls": 5}}, "openai.urls"),
        ({"openai": {"tokenizer": "remote"}}, "openai.tokenizer"),
        ({"openai": {"read_timeout_s": 0}}, "openai.read_timeout_s"),
        ({"openai": {"failures_to_eject": 0}}, "openai.failures_to_eject"),
        ({"openai": {"retries": -1}}, "openai.retries"),
        ({"openai": {"max_connections": 0}}, "openai.max_connections"),
        ({"vllm": {"gpu_memory_utilization": 1.5}}, "vllm.gpu_memory_utilization"),
        ({"vllm": {"kv_cache_gib": 0}}, "vllm.kv_cache_gib"),
    ],
)
def test_bad_values_name_the_field(sections, field):
    with pytest.raises(ConfigError) as e:
        RAGConfig().replace(**sections)
    assert e.value.field == field and field in str(e.value)


def test_urls_timeouts_and_pools_leave_the_answer_fingerprint_alone():
    base = RAGConfig().replace(**OPENAI)
    same = base.replace(openai={"urls": ["http://10.0.0.7:9000", "https://gpu-9.internal/v1"], "api_key": "k",
                                "connect_timeout_s": 9, "read_timeout_s": 9, "max_connections": 3,
                                "failures_to_eject": 9, "probe_interval_s": 9, "retries": 0,
                                "tokenizer": "server"},
                        vllm={"kv_cache_gib": 9, "dtype": "float32"})  # [vllm] is not this backend's
    assert same.fingerprint() == base.fingerprint()
    for change in ({"openai": {"model": "another-model"}}, {"generate": {"model": "/m"}},
                   {"generate": {"temperature": 0.5}}, {"generate": {"max_tokens": 9}},
                   {"generate": {"seed": 1}}):
        assert base.replace(**change).fingerprint() != base.fingerprint(), change
    assert base.fingerprint() != RAGConfig().fingerprint()  # two backends never share answers


def test_the_vllm_fingerprint_is_unchanged_by_the_move():
    """The keys (and L2 entries) of a config written before [vllm] existed stay valid."""
    cfg = RAGConfig()
    g = cfg.generate
    old = {"embed.model": cfg.embed.model, "prompt_template": PROMPT_TEMPLATE_VERSION,
           "prompt": dataclasses.asdict(cfg.prompt), "top_k": cfg.query.top_k,
           "generate": {"model": g.model, "max_tokens": g.max_tokens, "temperature": g.temperature,
                        "top_p": g.top_p, "seed": g.seed, "dtype": "bfloat16",
                        "max_model_len": g.max_model_len},
           "search": {"ivf_nprobe": 0, "hnsw_ef_search": 0}}
    assert cfg.fingerprint() == hashlib.sha256(orjson.dumps(old, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert cfg.replace(vllm={"dtype": "float16"}).fingerprint() != cfg.fingerprint()
    assert cfg.replace(vllm={"max_num_seqs": 8, "kv_cache_gib": 1}).fingerprint() == cfg.fingerprint()


def test_stream_interval_is_vllms_own_knob_and_never_part_of_an_answer():
    """It only groups tokens into pieces: the cache key must not change, and 0 is refused
    with the field named (vLLM would refuse it later, deep in engine start-up)."""
    cfg = RAGConfig()
    assert cfg.vllm.stream_interval == 1
    assert cfg.replace(vllm={"stream_interval": 8}).fingerprint() == cfg.fingerprint()
    with pytest.raises(ConfigError, match="vllm.stream_interval"):
        cfg.replace(vllm={"stream_interval": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new key is no legacy [generate] key: no FutureWarning
        with pytest.raises(ConfigError, match="generate.stream_interval"):
            cfg.replace(generate={"stream_interval": 8})
