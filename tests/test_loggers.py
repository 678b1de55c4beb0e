from medsft_lightning.training.loggers import MedSwanLabLogger, resolve_mode, scrub


def test_auto_mode_never_prompts(monkeypatch, tmp_path):
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path))  # no saved `swanlab login`
    monkeypatch.chdir(tmp_path)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("SWANLAB_API_KEY", "k")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("SWANLAB_MODE", "local")
    assert resolve_mode("auto") == "local"
    assert resolve_mode("disabled") == "disabled"


def test_logger_has_no_key_argument_and_scrubs_secrets():
    import inspect

    assert not any("key" in p or "token" in p for p in inspect.signature(MedSwanLabLogger).parameters)
    params = {"model": {"lr": 1, "api_key": "x", "nested": {"hf_token": "y"}}, "SWANLAB_API_KEY": "z"}
    assert scrub(params) == {"model": {"lr": 1, "nested": {}}}
