import pytest

from ragserve.config import RAGConfig
from ragserve.errors import ConfigError


def test_defaults_are_valid():
    cfg = RAGConfig()
    assert cfg.index.index_type == "auto"
    assert (cfg.index.ivf_nprobe, cfg.index.hnsw_ef_search) == (0, 0)  # 0: the manifest's defaults
    assert cfg.chunk.chunk_overlap < cfg.chunk.chunk_size


def test_env_vars_override_and_are_coerced():
    cfg = RAGConfig.load(env={"RAGSERVE_QUERY_TOP_K": "5", "RAGSERVE_VLLM_ENFORCE_EAGER": "false",
                              "RAGSERVE_GENERATE_TEMPERATURE": "0.5", "UNRELATED": "x"})
    assert cfg.query.top_k == 5
    assert cfg.vllm.enforce_eager is False
    assert cfg.generate.temperature == 0.5


def test_index_settings_from_env():
    cfg = RAGConfig.load(env={"RAGSERVE_INDEX_INDEX_TYPE": "hnsw-fp16", "RAGSERVE_INDEX_HNSW_EF_SEARCH": "256",
                              "RAGSERVE_INDEX_IVF_NPROBE": "32"})
    assert (cfg.index.index_type, cfg.index.hnsw_ef_search, cfg.index.ivf_nprobe) == ("hnsw-fp16", 256, 32)


def test_toml_file_then_env(tmp_path):
    p = tmp_path / "ragserve.toml"
    p.write_text('[query]\ntop_k = 7\n[generate]\nmax_tokens = 99\n')
    cfg = RAGConfig.load(p, env={"RAGSERVE_GENERATE_MAX_TOKENS": "12"})
    assert cfg.query.top_k == 7
    assert cfg.generate.max_tokens == 12


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"query": {"top_k": 0}}, "query.top_k"),
        ({"chunk": {"chunk_overlap": 999}}, "chunk.chunk_overlap"),
        ({"index": {"index_type": "hnsw-magic"}}, "index.index_type"),
        ({"index": {"ivf_nprobe": -1}}, "index.ivf_nprobe"),
        ({"index": {"hnsw_m": 1}}, "index.hnsw_m"),
        ({"index": {"hnsw_ef_construction": 0}}, "index.hnsw_ef_construction"),
        ({"generate": {"max_tokens": 4096, "max_model_len": 2048}}, "generate.max_model_len"),
        ({"vllm": {"dtype": "int3"}}, "vllm.dtype"),
        ({"generate": {"no_such_field": 1}}, "generate.no_such_field"),
        ({"query": {"top_k": "many"}}, "query.top_k"),
        ({"vllm": {"enforce_eager": "maybe"}}, "vllm.enforce_eager"),
        ({"embed": {"precision": "float8"}}, "embed.precision"),
    ],
)
def test_bad_values_name_the_field(sections, field):
    with pytest.raises(ConfigError) as e:
        RAGConfig().replace(**sections)
    assert e.value.field == field
    assert field in str(e.value)


def test_unknown_section_and_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown section"):
        RAGConfig().replace(nosuch={"x": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        RAGConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[query\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RAGConfig.load(bad)


def test_fingerprint_covers_what_changes_answers_only():
    base = RAGConfig()
    assert base.fingerprint() == RAGConfig().fingerprint()
    assert base.replace(embed={"batch_size": 7}).fingerprint() == base.fingerprint()
    assert base.replace(vllm={"kv_cache_gib": 4}).fingerprint() == base.fingerprint()
    # build-time index settings are covered by the index fingerprint (the manifest), not here
    assert base.replace(index={"hnsw_m": 16, "index_type": "ivf-fp16"}).fingerprint() == base.fingerprint()
    for change in ({"query": {"top_k": 4}}, {"generate": {"model": "/m"}}, {"generate": {"temperature": 0.7}},
                   {"generate": {"max_tokens": 10}},
                   # query-time search settings change which chunks come back, hence answers
                   {"index": {"ivf_nprobe": 64}}, {"index": {"hnsw_ef_search": 256}}):
        assert base.replace(**change).fingerprint() != base.fingerprint(), change


def test_embedding_is_single_threaded_beside_a_local_vllm_engine_only():
    from ragserve.rag import serving_embed_config

    local = RAGConfig()
    assert serving_embed_config(local, None).threads == 1
    assert serving_embed_config(local, object()).threads == 0  # an injected generator: not ours to judge
    remote = local.replace(generate={"backend": "openai"}, openai={"urls": ["http://gpu-1:8000"]})
    assert serving_embed_config(remote, None).threads == 0
    same_machine = local.replace(generate={"backend": "openai"}, openai={"urls": ["http://127.0.0.1:8000"]})
    assert serving_embed_config(same_machine, None).threads == 1
    assert serving_embed_config(local.replace(embed={"threads": 2}), None).threads == 2  # said explicitly


@pytest.mark.parametrize("content, names", [
    ('{"tenant-a-key-0123456789": "a\\u0000b"}', "control character"),
    ('{"tenant-a-key-0123456789": "' + "n" * 257 + '"}', "1 to 256 characters"),
    ('{"short": "tenant-a"}', "16+ characters"),
    ('["tenant-a-key-0123456789"]', "mapping key to namespace"),
    ("{not json", "not valid JSON"),
])
def test_a_keys_file_with_a_bad_entry_is_refused_at_load_naming_it(tmp_path, content, names):
    from ragserve.server.auth import ApiKeys

    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="server.api_keys_file") as refused:
        ApiKeys.load(path)
    assert names in str(refused.value)
    path.write_text('{"tenant-a-key-0123456789": "tenant-a"}')
    assert ApiKeys.load(path).namespace("Bearer tenant-a-key-0123456789") == "tenant-a"
