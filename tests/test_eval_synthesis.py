"""`python -m fetalstudio eval synthesis`: metrics with known answers on real images posing as generated ones.

"Generated" sets are made of real shared-data images: exact copies of training images (must be
near copies), blurred/flipped ones, and African images (new images: not near copies). The bundled
plane classifier gives the features. Everything runs on the CPU with one thread and a handful of images.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fetalstudio.cli import main
from fetalstudio.errors import FetalStudioError
from fetalstudio.evaluation.synthesis import command as synthesis_command
from fetalstudio.evaluation.synthesis.data import read_labelled, subsample
from fetalstudio.evaluation.synthesis.metrics import frechet_distance, mean_pairwise_ms_ssim, ms_ssim, nearest_distances
from fetalstudio.evaluation.synthesis.scoring import accuracy_target

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SPANISH = SHARED_DATA / "spanish_planes"
AFRICAN = SHARED_DATA / "african" / "train"
CLASSIFIER = REPO / "checkpoints" / "bundled" / "fetalstudio-plane-classifier" / "model.safetensors"
HAVE_DATA = (SPANISH / "labels.csv").is_file() and (AFRICAN / "labels.csv").is_file()
needs_data = pytest.mark.skipif(not (HAVE_DATA and CLASSIFIER.is_file()), reason="shared data or bundled classifier not present")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")


@pytest.fixture(scope="module")
def one_blas_thread():
    """Linear algebra (sqrtm, t-SNE) on one thread too: two fighting threads are far slower here."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


# --- helpers ---------------------------------------------------------------------------------
def _spanish(plane: str, count: int, start: int = 0) -> list[Path]:
    return sorted((SPANISH / plane).glob("*.png"))[start:start + count]


def _african(plane: str, count: int) -> list[Path]:
    with (AFRICAN / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["plane"] == plane]
    return [AFRICAN / r["filename"] for r in rows[:count]]


def _labels_csv(path: Path, images: dict[str, list[Path]]) -> Path:
    """A classification CSV (filename, plane) with absolute file names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "plane"])
        for plane, paths in images.items():
            writer.writerows([str(p), plane] for p in paths)
    return path


def _generated_folder(folder: Path, images: list[tuple[str, Path, str]]) -> Path:
    """A `generate --out`-style folder: OUT/<plane>/<sampler>/<name>.png + metadata.csv.
    ``images``: (plane, source image, transform: copy | blur_flip)."""
    from PIL import Image, ImageFilter, ImageOps

    rows = []
    for index, (plane, source, transform) in enumerate(images):
        relative = Path(plane) / "euler" / f"{plane}_euler_{index:05d}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        if transform == "copy":
            shutil.copyfile(source, folder / relative)
        else:
            with Image.open(source) as image:
                ImageOps.mirror(image.convert("L")).filter(ImageFilter.GaussianBlur(3)).save(folder / relative)
        rows.append({"file": relative.as_posix(), "plane": plane, "sampler": "euler", "seed": index})
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "plane", "sampler", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _eval(*args: str) -> list[str]:
    return ["eval", "synthesis", "--classifier", str(CLASSIFIER), "--device", "cpu", "--threads", "1", "--max-pairs", "10", *args]


# --- Fréchet distance --------------------------------------------------------------------------
def _exact_gaussian_sample(rng, n: int, mean, variances) -> np.ndarray:
    """n points whose sample mean and (n-1) sample covariance are exactly mean and diag(variances)."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * np.sqrt(variances) + np.asarray(mean)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    var_a, var_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 0.5, 1.0])
    a = _exact_gaussian_sample(rng, 50, np.zeros(4), var_a)
    for shift in (0.0, 0.5, 2.0):
        mean = np.array([1.0, 0.0, -2.0, 0.5]) * shift
        b = _exact_gaussian_sample(rng, 60, mean, var_b)
        expected = float((mean ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum())
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 512))  # fewer samples than dimensions: singular covariances
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    distances = [frechet_distance(a, a + shift) for shift in (0.1, 0.5, 1.0)]
    assert distances == pytest.approx([512 * 0.01, 512 * 0.25, 512 * 1.0], rel=1e-6)  # same covariance: ||shift||^2
    other = rng.normal(size=(30, 512))
    assert frechet_distance(a, other) < frechet_distance(a, other + 0.5) < frechet_distance(a, other + 1.0)


def test_frechet_distance_reduced_space_equals_the_full_computation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 40)), 1.5 * rng.normal(size=(9, 40)) + 0.2
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_needs_two_rows_and_matching_widths():
    assert math.isnan(frechet_distance(np.zeros((1, 3)), np.ones((5, 3))))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


# --- diversity and neighbours ----------------------------------------------------------------
def test_ms_ssim_of_identical_images_is_one_and_pairs_are_capped_reproducibly():
    rng = np.random.default_rng(0)
    images = (rng.random((6, 256, 256)) * 255).astype(np.uint8)
    assert ms_ssim(images[:2] / 255.0, images[:2] / 255.0) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ms_ssim(images[0] / 255.0, images[1] / 255.0)[0] < 0.5  # independent noise
    same = np.repeat(images[:1], 3, axis=0)
    assert mean_pairwise_ms_ssim(same, 200, seed=0) == (pytest.approx(1.0, abs=1e-5), 3)
    mean, pairs = mean_pairwise_ms_ssim(images, 4, seed=7, key="brain")
    assert pairs == 4 and mean_pairwise_ms_ssim(images, 4, seed=7, key="brain") == (mean, 4)
    assert mean_pairwise_ms_ssim(images[:1], 200, seed=0) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_nearest_distances_leave_one_out():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    distance, index = nearest_distances(points, points, leave_one_out=True)
    assert distance.tolist() == [1.0, 1.0, 4.0] and index.tolist() == [1, 0, 1]
    distance, index = nearest_distances(np.array([[4.0, 0.0]]), points)
    assert distance.tolist() == [1.0] and index.tolist() == [2]


def test_accuracy_targets_and_subsampling():
    classes = ("abdomen", "brain", "femur", "thorax", "other")
    assert accuracy_target("abdomen", classes) == "abdomen"
    assert accuracy_target("head_second", classes) == "brain"
    assert accuracy_target("cervix", classes) is None
    from fetalstudio.data.tables import LabelledImage

    items = [LabelledImage(Path(f"{plane}{i}.png"), plane) for plane in ("brain", "femur") for i in range(10)] + [LabelledImage(Path("x.png"), "other")]
    chosen = subsample(items, 3, seed=5)
    assert [i.plane for i in chosen].count("brain") == 3 and [i.plane for i in chosen].count("other") == 1
    assert chosen == subsample(items, 3, seed=5) and subsample(items, None, 0) == items


# --- reading sets ----------------------------------------------------------------------------
def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 30), 80).save(path)
    return path


def test_read_labelled_layouts(tmp_path):
    _png(tmp_path / "gen" / "brain" / "euler" / "a.png")
    _png(tmp_path / "gen" / "head_second" / "unipc" / "b.png")
    (tmp_path / "gen" / "metadata.csv").write_text("file,plane,seed\nbrain/euler/a.png,brain,0\nhead_second/unipc/b.png,head_second,1\n")
    from_folder = read_labelled(tmp_path / "gen", "synthetic")
    assert [(i.path.name, i.plane) for i in from_folder] == [("a.png", "brain"), ("b.png", "head_second")]
    assert [i.plane for i in read_labelled(tmp_path / "gen" / "metadata.csv", "synthetic")] == ["brain", "head_second"]
    (tmp_path / "gen" / "labels.csv").write_text("filename,plane\nbrain/euler/a.png,Brain\n")
    assert [(i.path.name, i.plane) for i in read_labelled(tmp_path / "gen" / "labels.csv", "synthetic")] == [("a.png", "brain")]
    _png(tmp_path / "folders" / "femur" / "c.png")
    assert [(i.path.name, i.plane) for i in read_labelled(tmp_path / "folders", "real")] == [("c.png", "femur")]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_plane_column", "no plane labels"),
    ("empty_plane", "no plane label"),
    ("missing_image", "do not exist"),
    ("metadata_without_plane", "no plane labels"),
])
def test_read_labelled_errors_are_actionable(tmp_path, case, message):
    _png(tmp_path / "a.png")
    source = {
        "missing": tmp_path / "nothing-here",
        "no_plane_column": tmp_path / "t.csv",
        "empty_plane": tmp_path / "gen",
        "missing_image": tmp_path / "m.csv",
        "metadata_without_plane": tmp_path / "gen2",
    }[case]
    (tmp_path / "t.csv").write_text("filename,sampler\na.png,euler\n")
    (tmp_path / "m.csv").write_text("filename,plane\na.png,brain\ngone.png,brain\n")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "metadata.csv").write_text("file,plane\n../a.png,\n")
    (tmp_path / "gen2").mkdir()
    (tmp_path / "gen2" / "metadata.csv").write_text("file,seed\n../a.png,0\n")
    with pytest.raises(FetalStudioError, match=message):
        read_labelled(source, "synthetic")


# --- the command, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def copies_report(tmp_path_factory, one_torch_thread, one_blas_thread):
    """Generated = exact copies of training images (abdomen, brain 2 each, femur 1) plus two
    blurred, mirrored brain images labelled head_second (no real heads)."""
    root = tmp_path_factory.mktemp("copies")
    real = _labels_csv(root / "real" / "labels.csv", {plane: _spanish(plane, 6) for plane in ("abdomen", "brain", "femur")})
    african = _labels_csv(root / "african.csv", {plane: _african(plane, 3) for plane in ("abdomen", "brain")})
    generated = _generated_folder(root / "generated", [
        ("abdomen", _spanish("abdomen", 1, 0)[0], "copy"), ("abdomen", _spanish("abdomen", 1, 1)[0], "copy"),
        ("brain", _spanish("brain", 1, 0)[0], "copy"), ("brain", _spanish("brain", 1, 1)[0], "copy"),
        ("femur", _spanish("femur", 1, 2)[0], "copy"),
        ("head_second", _spanish("brain", 1, 2)[0], "blur_flip"), ("head_second", _spanish("brain", 1, 3)[0], "blur_flip"),
    ])
    out, summary = root / "report", root / "headline.json"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(_eval("--synthetic", str(generated), "--real", str(real), "--african", str(african),
                          "--out", str(out), "--json", str(summary), "--nn-pairs", "4"))
    assert code == 0
    return out, json.loads(summary.read_text()), json.loads(stdout.getvalue().strip().splitlines()[-1])


@needs_data
def test_cli_writes_every_report_file_and_the_headline_json(copies_report):
    from PIL import Image

    out, headline, printed = copies_report
    for name in ("summary.md", "per_plane.csv", "per_image.csv", "summary.json", "tsne.png", "nearest_neighbours.png"):
        assert (out / name).is_file(), name
    for name in ("tsne.png", "nearest_neighbours.png"):
        with Image.open(out / name) as image:
            assert image.width > 300 and image.height > 200
    expected = {"accuracy", "classifier_feature_frechet", "ms_ssim_synthetic", "ms_ssim_real", "near_copy_fraction", "fid"}
    assert expected <= set(headline)
    assert headline["fid"] is None and headline["n_synthetic"] == 7 and headline["n_real"] == 18
    assert {k: printed[k] for k in headline} == headline and printed["report"].endswith("summary.md")
    assert 0.0 <= headline["accuracy"] <= 1.0 and headline["classifier_feature_frechet"] > 0
    assert 0.0 < headline["ms_ssim_synthetic"] <= 1.0 and 0.0 < headline["ms_ssim_real"] <= 1.0
    assert headline["classifier_feature_frechet_real_vs_african"] > 0
    text = (out / "summary.md").read_text()
    assert "classifier-feature Fréchet distance" in text and "not FID" in text
    assert "FID was not computed" in text and "--inception-weights" in text
    assert "![t-SNE](tsne.png)" in text and "![nearest neighbours](nearest_neighbours.png)" in text


@needs_data
def test_exact_copies_of_training_images_are_near_copies(copies_report):
    out, headline, _ = copies_report
    assert headline["near_copy_fraction"] == 1.0
    assert headline["near_copy_fraction_pixel"] == 1.0 and headline["near_copy_fraction_feature"] == 1.0
    rows = {r["file"]: r for r in _read_rows(out / "per_image.csv")}
    copies = [r for r in rows.values() if r["plane"] != "head_second"]
    assert len(copies) == 5
    for row in copies:
        assert float(row["nn_pixel_distance"]) < 1e-5 and float(row["nn_feature_distance"]) < 1e-4
        assert row["near_copy"] == "True" and row["nn_pixel_train_file"] == row["nn_feature_train_file"]
    original = _spanish("abdomen", 1, 0)[0]
    assert rows["abdomen/euler/abdomen_euler_00000.png"]["nn_pixel_train_file"].endswith(original.name)
    planes = {r["plane"]: r for r in _read_rows(out / "per_plane.csv")}
    assert float(planes["abdomen"]["near_copy_fraction"]) == 1.0
    assert float(planes["abdomen"]["nn_pixel_ratio"]) < 1e-4 and float(planes["abdomen"]["nn_pixel_median_real"]) > 0.01


@needs_data
def test_kept_csv_drops_the_near_copies_and_reads_as_training_data(copies_report):
    from fetalstudio.data.tables import read_classification

    out, headline, _ = copies_report
    kept = read_classification(out / "kept.csv")
    # the five exact copies are dropped; the two head images have no training images of their plane: kept
    assert headline["kept_after_filter"] == 2 == len(kept)
    assert {item.plane for item in kept} == {"head_second"}
    generated = out.parent / "generated"
    assert {item.path.resolve() for item in kept} == {p.resolve() for p in (generated / "head_second").rglob("*.png")}
    assert "kept.csv" in (out / "summary.md").read_text()


@needs_data
def test_planes_without_real_images_or_with_one_image_get_n_a(copies_report):
    out, headline, _ = copies_report
    planes = {r["plane"]: r for r in _read_rows(out / "per_plane.csv")}
    assert list(planes) == ["abdomen", "brain", "femur", "head_second"]
    head = planes["head_second"]
    assert head["n_real"] == "0" and head["accuracy_target"] == "brain" and head["accuracy"] != ""
    assert head["classifier_feature_frechet"] == "" and head["near_copy_fraction"] in ("", None)
    assert float(head["ms_ssim_synthetic"]) > 0 and "no real images" in head["note"]
    femur = planes["femur"]
    assert femur["n_synthetic"] == "1" and femur["ms_ssim_synthetic"] == "" and femur["classifier_feature_frechet"] == ""
    assert "fewer than 2 generated images" in femur["note"]
    images = _read_rows(out / "per_image.csv")
    own = [r for r in images if r["plane"] in ("abdomen", "brain", "femur")]
    assert headline["accuracy"] == pytest.approx(sum(r["correct"] == "True" for r in own) / len(own))
    summary = (out / "summary.md").read_text()
    assert "head_second: scored as brain" in summary


@needs_data
def test_african_images_are_not_near_copies_of_spanish_training_images(tmp_path):
    generated = _labels_csv(tmp_path / "african_as_generated.csv", {plane: _african(plane, 3) for plane in ("abdomen", "brain")})
    out, summary = tmp_path / "report", tmp_path / "h.json"
    assert main(_eval("--synthetic", str(generated), "--real", str(SPANISH), "--max-images-per-plane", "4",
                      "--out", str(out), "--json", str(summary), "--seed", "3")) == 0
    headline = json.loads(summary.read_text())
    assert headline["near_copy_fraction"] == 0.0 and headline["near_copy_fraction_pixel"] == 0.0
    assert headline["n_real"] == 20  # 4 per plane for the metrics ...
    planes = {r["plane"]: r for r in _read_rows(out / "per_plane.csv")}
    assert planes["abdomen"]["n_train"] == "20"  # ... but the audit sees every training image
    assert float(planes["abdomen"]["nn_pixel_ratio"]) > 1.0


@needs_data
def test_fid_with_torchvision_inception_weights(tmp_path):
    import torchvision

    weights = tmp_path / "inception_v3_random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    generated = _generated_folder(tmp_path / "generated", [("brain", p, "blur_flip") for p in _spanish("brain", 2, 4)])
    real = _labels_csv(tmp_path / "real.csv", {"brain": _spanish("brain", 2)})
    out, summary = tmp_path / "report", tmp_path / "h.json"
    assert main(_eval("--synthetic", str(generated), "--real", str(real), "--inception-weights", str(weights),
                      "--out", str(out), "--json", str(summary), "--batch-size", "4")) == 0
    headline = json.loads(summary.read_text())
    assert math.isfinite(headline["fid"]) and headline["fid"] > 0 and headline["fid_weights"] == str(weights)
    assert float(_read_rows(out / "per_plane.csv")[0]["fid"]) == pytest.approx(headline["fid"])
    text = (out / "summary.md").read_text()
    assert f"FID (torchvision Inception-v3 weights from {weights})" in text
    assert "not comparable" in text and "TF-Inception" in text


@needs_data
@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "could not be read as a PyTorch state dict"),
    ("resnet", "is not a torchvision inception_v3 state dict"),
])
def test_bad_inception_weights_are_a_clear_error(tmp_path, capsys, content, message):
    weights = tmp_path / "weights.pth"
    if content == "resnet":
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "bn1.bias": torch.zeros(4)}, weights)
    else:
        weights.write_bytes(content)
    generated = _generated_folder(tmp_path / "generated", [("brain", _spanish("brain", 1)[0], "copy")])
    code = main(_eval("--synthetic", str(generated), "--real", str(SPANISH), "--inception-weights", str(weights), "--out", str(tmp_path / "r")))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "inception_v3_google-0cc3c7bd.pth" in err
    assert not (tmp_path / "r").exists()


@needs_data
def test_command_errors(tmp_path, capsys, monkeypatch):
    generated = _generated_folder(tmp_path / "generated", [("brain", _spanish("brain", 1)[0], "copy")])
    out = str(tmp_path / "r")
    assert main(_eval("--synthetic", str(tmp_path / "nope"), "--out", out)) == 2
    assert "--synthetic" in capsys.readouterr().err
    monkeypatch.setattr(synthesis_command, "DEFAULT_REAL", tmp_path / "no-shared-data")
    assert main(_eval("--synthetic", str(generated), "--out", out)) == 2
    assert "pass --real" in capsys.readouterr().err.lower()
    broken = _generated_folder(tmp_path / "broken", [("brain", _spanish("brain", 1)[0], "copy")])
    next(broken.rglob("*.png")).write_bytes(b"\x89PNG truncated")
    assert main(_eval("--synthetic", str(broken), "--real", str(SPANISH), "--out", out)) == 2
    assert "could not be read as an image" in capsys.readouterr().err
    assert main(_eval("--synthetic", str(generated), "--real", str(SPANISH), "--out", out, "--max-pairs", "0")) == 2
    assert "--max-pairs must be at least 1" in capsys.readouterr().err


def test_eval_synthesis_is_listed_in_the_cli(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "synthesis" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "synthesis", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--synthetic", "--real", "--african", "--train-real", "--classifier", "--inception-weights", "--max-pairs",
                   "--max-images-per-plane", "--json", "--out", "--seed", "--device", "--batch-size"):
        assert option in help_text


def test_the_synthesis_evaluation_is_split_by_concern():
    """Issue 12: metrics are pure numbers; only the command module knows argparse and the model manager."""
    import ast

    imports = {}
    for path in Path(synthesis_command.__file__).parent.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        imports[path.stem] = names
    assert {"command", "data", "features", "metrics", "plots", "report", "scoring"} <= set(imports)
    assert not any(name.startswith("fetalstudio") for name in imports["metrics"])
    assert [stem for stem, names in imports.items() if names & {"argparse", "fetalstudio.app_context", "fetalstudio.cli_args"}] == ["command"]
    assert not any("fetalstudio.evaluation.synthesis.command" in names for names in imports.values())
