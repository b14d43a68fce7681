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


def test_app_launch_options_parse(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetalstudio_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    options = app.parse_args(["--host", "0.0.0.0", "--auth", "u:p", "--data-dir", str(tmp_path / "a"), "--data-dir",
                              str(tmp_path / "b"), "--max-file-size", "50", "--max-pixels", "1000000", "--no-browser"])
    assert options.data_dirs == (tmp_path / "a", tmp_path / "b")
    assert options.max_file_size_bytes == 50 * 1024 * 1024 and options.max_pixels == 1_000_000
    assert options.open_browser is False and options.exposed
    defaults = app.parse_args([])
    assert defaults.max_file_size_mb == 200 and defaults.open_browser and not defaults.exposed


# --- shared argument checks (issue 11, item 7) -------------------------------------------------

COMMANDS_WITH_OUT = [["generate", "--plane", "brain"], ["extract", "--csv", "x.csv"], ["analyze", "--in", "x"],
                     ["eval", "classifier", "--data", "x"], ["eval", "segmenter", "--csv", "x"], ["eval", "synthesis"],
                     ["train", "sd"], ["train", "lora"], ["train", "classifier"], ["train", "segmenter"]]
COMMANDS_WITH_BATCH_SIZE = [["generate"], ["eval", "classifier"], ["eval", "synthesis"], ["train", "sd"], ["train", "lora"],
                            ["train", "classifier"], ["train", "segmenter"]]
COMMANDS_WITH_DEVICE = [["analyze"], ["eval", "classifier"], ["eval", "synthesis"]]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", COMMANDS_WITH_OUT, ids=" ".join)
def test_every_out_that_is_a_file_is_refused(command, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    err = _usage_error([*command, "--out", str(existing)], capsys)
    assert f"argument --out: {existing} is a file, not a folder" in err and existing.read_text() == "mine"


@pytest.mark.parametrize("command", COMMANDS_WITH_BATCH_SIZE, ids=" ".join)
@pytest.mark.parametrize("value", ["0", "-4", "two"])
def test_every_batch_size_below_one_is_refused(command, value, capsys):
    err = _usage_error([*command, "--batch-size", value], capsys)
    assert "argument --batch-size: must be" in err and "at least 1" in err


@pytest.mark.parametrize("command", COMMANDS_WITH_DEVICE, ids=" ".join)
def test_every_device_option_names_the_valid_and_available_devices(command, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error([*command, "--device", "banana"], capsys)
    assert "'banana' is not a device; use cpu, cuda, cuda:N (one GPU) or mps" in err and "Available here: cpu" in err
    err = _usage_error([*command, "--device", "cuda"], capsys)
    assert "'cuda': this machine has no CUDA GPU" in err and "Available here: cpu" in err


def test_the_device_environment_variable_is_checked_too(monkeypatch):
    from fetalstudio.models.device import default_placement

    monkeypatch.setenv("FETALSTUDIO_DEVICE", "banana")
    with pytest.raises(FetalStudioError, match=r"\$FETALSTUDIO_DEVICE 'banana' is not a device.*Available here: cpu"):
        default_placement()
    assert default_placement("cpu").device.type == "cpu"


@pytest.mark.parametrize("command", [["analyze", "--in"], ["extract", "--csv"]], ids=" ".join)
def test_a_csv_that_is_not_utf8_is_named_with_its_line(command, tmp_path, capsys):
    table = tmp_path / "latin1.csv"
    table.write_bytes("image,mask\nok.png,ok_mask.png\nb\u00e9b\u00e9.png,m.png\n".encode("latin-1"))
    assert main([*command, str(table), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(table) in err and "not UTF-8" in err and "line 3" in err and "Save it as UTF-8" in err


def test_extract_refuses_an_empty_mask_cell_and_a_non_finite_pixel_size(tmp_path, capsys):
    mask = tmp_path / "m.png"
    from PIL import Image

    Image.new("L", (40, 30)).save(mask)
    (tmp_path / "empty.csv").write_text(f"image,mask\nx.png,{mask}\ny.png,\n")
    assert main(["extract", "--csv", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "a")]) == 2
    assert "line 3: the mask cell is empty" in capsys.readouterr().err
    for value in ("inf", "nan", "-1"):
        (tmp_path / "size.csv").write_text(f"image,mask,pixel_size_mm\nx.png,{mask},{value}\n")
        assert main(["extract", "--csv", str(tmp_path / "size.csv"), "--out", str(tmp_path / "b")]) == 2
        assert f"line 2: pixel_size_mm '{value}' is not a positive number" in capsys.readouterr().err


# --- one way to register a command (issue 12) ---------------------------------------------------

def _subcommand_parsers(parser) -> dict[str, object]:
    """Every leaf command's parser by its words ("generate", "train sd", ...)."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _subcommand_parsers(sub)
                found.update({f"{name} {key}": value for key, value in inner.items()} if inner else {name: sub})
    return found


def test_every_command_is_a_command_listed_once_and_runs_its_own_run():
    from fetalstudio.cli import build_parser, commands
    from fetalstudio.cli_args import Command, CommandGroup

    listed = {}
    for entry in commands():
        for command in entry.commands if isinstance(entry, CommandGroup) else (entry,):
            assert isinstance(command, Command)
            listed[f"{entry.name} {command.name}" if isinstance(entry, CommandGroup) else command.name] = command
    parsers = _subcommand_parsers(build_parser())
    assert set(parsers) == set(listed) == {"generate", "models", "params", "extract", "analyze", "train sd", "train lora",
                                           "train classifier", "train segmenter", "train controlnet", "train detector", "train head-unet", "train ssl", "eval classifier", "eval segmenter",
                                           "eval synthesis", "eval flex", "flex presets", "flex pairs"}
    for words, parser in parsers.items():
        assert parser.get_default("handler") is listed[words].run, words
    assert parsers["eval synthesis"].description.startswith("Evaluate generated images against real ones")


def test_commands_are_registered_only_through_cli_args():
    """No command module builds its own sub-parser: ``add_parser`` is called in cli_args.py alone."""
    library = REPO / "fetalstudio"
    callers = sorted(str(path.relative_to(REPO)) for path in library.rglob("*.py") if ".add_parser(" in path.read_text(encoding="utf-8"))
    assert callers == ["fetalstudio/cli_args.py"]


def test_a_command_registers_its_help_options_and_handler():
    import argparse

    from fetalstudio.cli_args import Command, CommandGroup

    ran = []
    hello = Command("hello", "say hello", lambda parser: parser.add_argument("--name", default="you"),
                    lambda args: ran.append(args.name) or 3, description="Says hello.")
    parser = argparse.ArgumentParser(prog="x")
    CommandGroup("greet", "greetings", (hello,)).register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["greet", "hello", "--name", "Ada"])
    assert args.greet_command == "hello" and args.handler(args) == 3 and ran == ["Ada"]
    with pytest.raises(SystemExit):
        parser.parse_args(["greet"])  # a group needs one of its commands
