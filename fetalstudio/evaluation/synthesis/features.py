"""Features of ``eval synthesis``: the plane classifier's pooled features and probabilities, Inception-v3 for FID."""

from __future__ import annotations

from pathlib import Path

from fetalstudio.errors import FetalStudioError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"


def classifier_outputs(classifier, tensors: list, batch_size: int, with_probabilities: bool = True):
    """(N x D pooled penultimate features, N x classes probabilities or None) of a timm classifier."""
    import numpy as np
    import torch

    model = classifier.model
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise FetalStudioError(f"The classifier ({type(model).__name__}) has no timm forward_features/forward_head, so its features "
                               "cannot be read. Use a classifier trained with `python -m fetalstudio train classifier`.")
    if not tensors:
        return np.zeros((0, 0)), np.zeros((0, len(classifier.classes)))
    features, probabilities = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(tensors), batch_size):
                batch = torch.stack(tensors[start:start + batch_size]).to(classifier.device, classifier.dtype)
                trunk = model.forward_features(batch)
                features.append(model.forward_head(trunk, pre_logits=True).float().flatten(1).cpu())
                if with_probabilities:
                    probs = torch.softmax(model.forward_head(trunk).float(), dim=1)
                    if classifier.hflip_tta:
                        probs = (probs + torch.softmax(model(torch.flip(batch, dims=[3])).float(), dim=1)) / 2
                    probabilities.append(probs.cpu())
    finally:
        model.train(was_training)
    return torch.cat(features).double().numpy(), (torch.cat(probabilities).double().numpy() if with_probabilities else None)


def load_inception(path: Path, device=None):
    """torchvision Inception-v3 with the weights of ``path``, returning 2048-d pool features."""
    import torch
    import torchvision

    path = Path(path).expanduser()
    expected = (f"Give torchvision's Inception-v3 ImageNet weights (a state dict), e.g. {INCEPTION_URL} "
                "saved as inception_v3_google-0cc3c7bd.pth, or leave out --inception-weights.")
    if not path.is_file():
        raise FetalStudioError(f"--inception-weights {path} does not exist. {expected}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors alike
        raise FetalStudioError(f"--inception-weights {path} could not be read as a PyTorch state dict ({type(error).__name__}: {error}). {expected}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FetalStudioError(f"--inception-weights {path} is not a state dict of tensors. {expected}")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier head is not used
    aux = any(k.startswith("AuxLogits.") for k in state)
    model = torchvision.models.inception_v3(weights=None, aux_logits=aux, transform_input=True, init_weights=False)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = "; ".join(str(error).splitlines()[:3])
        raise FetalStudioError(f"--inception-weights {path} does not fit torchvision's inception_v3 ({first}). {expected}") from error
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise FetalStudioError(f"--inception-weights {path} is not a torchvision inception_v3 state dict ({len(missing)} missing and "
                               f"{len(unexpected)} unexpected tensors, e.g. {example!r}). {expected}")
    model.fc = torch.nn.Identity()
    return model.eval().to(device or "cpu", torch.float32)


def inception_features(model, images: list, batch_size: int):
    """N x 2048 pool features: grayscale 299 px uint8 -> 3 channels, ImageNet normalisation."""
    import numpy as np
    import torch

    if not images:
        return np.zeros((0, 2048))
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start:start + batch_size])).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
            rows.append(model(((batch - mean) / std).to(device)).float().cpu())
    return torch.cat(rows).double().numpy()

