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


# Settings a run logs whose names contain "token" or "key" but hold no secret: all of them reach SwanLab.
KEPT = {"max_new_tokens": 320, "max_think_tokens": 64, "tokenizer": "Qwen/Qwen3-1.7B", "tokenizer_revision": "v1",
        "train_supervised_tokens": 10_400, "val_supervised_tokens": 1_200, "supervised_tokens_per_s": 264.0,
        "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "think_end_token": "</think>", "val_token_acc": 0.4,
        "monitor_key": "val_loss", "sort_key": "length", "keyword": "fever", "num_tokens": 7, "max_tokens": 9}
# Credentials, by kind: none of them does.
DROPPED = {"api_key": "a", "apiKey": "b", "SWANLAB_API_KEY": "c", "OPENAI_API_KEY": "d", "hf_token": "e",
           "token": "f", "HF_TOKEN": "g", "MODELSCOPE_API_TOKEN": "h", "access_token": "i", "auth_token": "j",
           "password": "k", "db_password": "l", "client_secret": "m", "AWS_SECRET_ACCESS_KEY": "n",
           "private_key": "o", "authorization": "p", "x-api-key": "q"}


def test_scrub_drops_credentials_by_kind_and_keeps_every_other_setting():
    assert scrub({"model": {"generation": dict(KEPT)}, **DROPPED}) == {"model": {"generation": KEPT}}
    assert scrub(KEPT) == KEPT
