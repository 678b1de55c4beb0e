"""hub.resolve_model: Hugging Face ids with revision and cache_dir, and the cache-first ``local_first``."""

from __future__ import annotations

import logging

import pytest

from medsft_lightning import hub


def recorder(calls: list, folder: str, cached: bool = True):
    """A download function that records its arguments; with ``cached=False`` only a real download succeeds."""

    def fake(repo_id, revision, cache_dir, allow_patterns=None, local_files_only=False):
        calls.append({"id": repo_id, "revision": revision, "cache_dir": cache_dir, "patterns": allow_patterns,
                      "local_files_only": local_files_only})
        if local_files_only and not cached:
            raise FileNotFoundError(f"{repo_id} is not cached")  # what the hubs' cache-miss errors are like
        return folder

    return fake


def test_hf_ids_are_downloaded_with_revision_and_cache_dir(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(hub, "download_hf_model", recorder(calls, str(tmp_path / "hf-snapshot")))
    monkeypatch.setattr(hub, "download_model", lambda *a, **k: pytest.fail("hf:// must not reach ModelScope"))
    got = hub.resolve_model("hf://Qwen/Qwen3-1.7B", revision="v1.0", cache_dir=str(tmp_path / "cache"))
    assert got == str(tmp_path / "hf-snapshot")  # a local folder, not the bare id left to from_pretrained
    hub.resolve_model("hf://Qwen/Qwen3-1.7B", revision="v1.0", cache_dir=str(tmp_path / "cache"), tokenizer_only=True)
    base = {"id": "Qwen/Qwen3-1.7B", "revision": "v1.0", "cache_dir": str(tmp_path / "cache"),
            "local_files_only": False}
    assert calls == [{**base, "patterns": None}, {**base, "patterns": hub.TOKENIZER_FILES}]
    assert {"*.json", "*.jinja"} <= set(hub.TOKENIZER_FILES)  # config.json, generation_config.json, chat template


@pytest.mark.parametrize("name, function", [("Qwen/Qwen3-1.7B", "download_model"),
                                            ("hf://Qwen/Qwen3-1.7B", "download_hf_model")])
def test_local_first_uses_the_cache_and_downloads_only_on_a_miss(tmp_path, monkeypatch, caplog, name, function):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").write_bytes(b"")
    hit: list[dict] = []
    monkeypatch.setattr(hub, function, recorder(hit, str(snapshot)))
    assert hub.resolve_model(name, "v1.0", "c", local_first=True) == str(snapshot)
    assert [c["local_files_only"] for c in hit] == [True]  # found in the cache: no download
    miss: list[dict] = []
    monkeypatch.setattr(hub, function, recorder(miss, str(snapshot), cached=False))
    with caplog.at_level(logging.INFO, logger=hub.__name__):
        assert hub.resolve_model(name, "v1.0", "c", tokenizer_only=True, local_first=True) == str(snapshot)
    assert [(c["local_files_only"], c["patterns"], c["revision"]) for c in miss] == [
        (True, hub.TOKENIZER_FILES, "v1.0"), (False, hub.TOKENIZER_FILES, "v1.0")]
    assert "not in the download cache" in caplog.text and "Downloading Qwen/Qwen3-1.7B" in caplog.text


def test_local_first_counts_a_cached_snapshot_without_weights_as_a_miss(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(hub, "download_model", recorder(calls, str(tmp_path)))  # config and tokenizer only
    hub.resolve_model("Qwen/Qwen3-1.7B", local_first=True)
    assert [c["local_files_only"] for c in calls] == [True, False]
    calls.clear()
    hub.resolve_model("Qwen/Qwen3-1.7B", tokenizer_only=True, local_first=True)  # no weights wanted
    assert [c["local_files_only"] for c in calls] == [True]


def test_download_functions_with_the_old_signature_still_work(tmp_path, monkeypatch):
    calls = []

    def old_fake(model_id, revision, cache_dir, allow_patterns=None):
        calls.append(model_id)
        return str(tmp_path)

    monkeypatch.setattr(hub, "download_model", old_fake)
    monkeypatch.setattr(hub, "download_hf_model", old_fake)
    assert hub.resolve_model("Qwen/Qwen3-1.7B") == hub.resolve_model("hf://Qwen/Qwen3-1.7B") == str(tmp_path)
    assert calls == ["Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B"]


def test_local_files_only_reaches_the_real_hub_libraries_without_network(tmp_path):
    """The real download functions with ``local_files_only``: the cached snapshot, or an error at once."""
    ms = tmp_path / "ms" / "models" / "Qwen--Qwen3-1.7B" / "snapshots" / "master"
    ms.mkdir(parents=True)
    (ms / "config.json").write_text("{}")
    got = hub.download_model("Qwen/Qwen3-1.7B", None, str(tmp_path / "ms"), hub.TOKENIZER_FILES, local_files_only=True)
    assert got == str(ms)
    with pytest.raises(Exception, match="Cannot find cached snapshot"):  # modelscope_hub.errors.CacheNotFound
        hub.download_model("Qwen/Qwen3-1.7B", "v9", str(tmp_path / "ms"), local_files_only=True)
    commit = "a" * 40
    repo = tmp_path / "hf" / "models--Qwen--Qwen3-1.7B"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1.0").write_text(commit)
    got = hub.download_hf_model("Qwen/Qwen3-1.7B", "v1.0", str(tmp_path / "hf"), hub.TOKENIZER_FILES,
                                local_files_only=True)
    assert got == str(repo / "snapshots" / commit)
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        hub.download_hf_model("Qwen/Qwen3-1.7B", "main", str(tmp_path / "hf"), local_files_only=True)
