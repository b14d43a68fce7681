"""CLI argument handling and app launch safety (no server is started here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fetalstudio.cli import main
from fetalstudio.errors import FetalStudioError
from fetalstudio.ui.server import ServerOptions, check_server_options, is_loopback, parse_auth

REPO = Path(__file__).resolve().parent.parent


def test_generate_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--plane", "--trimester", "--n", "--sampler", "--out", "--model", "--lora", "--steps", "--guidance",
                   "--width", "--height", "--seed", "--prompt", "--negative-prompt", "--batch-size"):
        assert option in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--plane", "cervix"], "Unknown plane 'cervix'"),
        (["--plane", "head"], "--plane head needs --trimester"),
        (["--plane", "brain", "--sampler", "euler,heun"], "Unknown sampler 'heun'"),
        (["--plane", "brain", "--n", "0"], "--n must be at least 1"),
    ],
)
def test_generate_bad_arguments_exit_2_with_a_reason(argv, message, tmp_path, capsys):
    assert main(["generate", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_generate_without_any_generator_says_how_to_install_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.delenv("FETALSTUDIO_MODELS", raising=False)
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--plane", "brain", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "No image generator is installed yet" in err and "model_index.json" in err


def test_unknown_model_path_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path))
    assert main(["generate", "--plane", "brain", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a known model id nor an existing file" in capsys.readouterr().err


def test_models_command_lists_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path))
    (tmp_path / "manifest.toml").write_text('[[model]]\nid = "sd15"\nkind = "sd_pipeline"\nhub_repo = "org/sd15"\nlicence = "CreativeML OpenRAIL-M"\n')
    assert main(["models", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["id"] == "sd15" and row["source"] == "hub:org/sd15" and row["loaded"] is False


def test_python_dash_m_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fetalstudio", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("192.168.1.5", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_exposed_host_or_share_needs_auth():
    with pytest.raises(FetalStudioError, match="Refusing to listen on 0.0.0.0 without a password"):
        check_server_options(ServerOptions(host="0.0.0.0"))
    with pytest.raises(FetalStudioError, match="--share .* needs --auth"):
        check_server_options(ServerOptions(share=True))
    assert check_server_options(ServerOptions(host="0.0.0.0", auth=("a", "b"))).host == "0.0.0.0"
    with pytest.raises(FetalStudioError, match="not a valid port"):
        check_server_options(ServerOptions(port=70000))


@pytest.mark.parametrize("text", ["user", ":pw", "user:"])
def test_bad_auth_strings(text):
    with pytest.raises(FetalStudioError, match="USER:PASSWORD"):
        parse_auth(text)
