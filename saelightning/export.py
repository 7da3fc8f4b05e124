"""The on-disk SAE format: SAELens 6's directory layout, written atomically and read back with checks.

    dir/cfg.json                  d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
                                  reshape_activations, metadata {...}, architecture (+ its keys, e.g. k)
    dir/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in] and, by
                                  architecture, b_enc / threshold / b_gate, b_mag, r_mag
    dir/sparsity.safetensors      optional: "sparsity" [d_sae] = log10 feature density

So SAELens (SAE.load_from_disk), SAEBench and SAEDashboard read our SAEs as they are, and load_sae
reads SAELens-written directories of the architectures we have (standard, topk, jumprelu, gated).
Exported SAEs work on raw activations: save_sae folds the training input scale into the weights.

A crosscoder (architecture crosscoder / crosscoder_l1) has no SAELens layout: its cfg.json has d_in (one model's
width) and n_models, and its tensors take the names and shapes of science-of-finetuning's dictionary_learning
CrossCoder state dict: encoder.weight [M, d_in, d_sae], encoder.bias [d_sae], decoder.weight [M, d_sae, d_in],
decoder.bias [M, d_in], threshold (0-dim: f_i·Σ_m‖d_i^m‖ > threshold at inference; the BatchTopK one only),
and folded_scale [M] (each model's normalisation constant, folded into the weights: decoder norms times it are the
normalised norms Δ is read in). load_dictionary_learning reads their own checkpoints (config.json +
model.safetensors, as their hub upload writes, or a torch state dict file).
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saelightning.atomic import atomic_dir
from saelightning.errors import SAELightningError
from saelightning.saes import SAE, SAEConfig, build_sae
from saelightning.saes.base import CROSSCODERS, DTYPES
from saelightning.saes.clt import CrossLayerTranscoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
# SAELens picks its 6.x cfg parser from metadata.sae_lens_version; without it, its pre-6 path
# would drop the nested metadata. This marks the format version we write, not a SAELens install.
SAELENS_FORMAT_VERSION = "6.0.0"
# SAELens architecture name on disk -> ours (batchtopk and matryoshka are written as jumprelu)
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "crosscoder": "crosscoder", "crosscoder_l1": "crosscoder_l1"}
# a transcoder's name on disk, by the SAE's exported name and whether it has W_skip: SAELens 6's Transcoder,
# SkipTranscoder, JumpReLUTranscoder and JumpReLUSkipTranscoder; it has no TopK transcoder, so ours are named
# topk_transcoder / topk_skip_transcoder (the same keys plus k) and only saelightning reads them
TRANSCODER_NAMES = {("standard", False): "transcoder", ("standard", True): "skip_transcoder",
                    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
                    ("topk", False): "topk_transcoder", ("topk", True): "topk_skip_transcoder"}
FROM_TRANSCODER = {name: (arch, skip) for (arch, skip), name in TRANSCODER_NAMES.items()}


def save_sae(sae: SAE, out_dir, metadata: dict | None = None, sparsity: torch.Tensor | None = None) -> Path:
    """Write `sae` (input scale folded in) to out_dir in the SAELens layout; returns out_dir.

    metadata: JSON-serialisable extras for cfg.json's "metadata" (hook_name, model, metrics...), added
    to sae.metadata. sparsity: log10 feature density [d_sae], written to sparsity.safetensors.
    An existing out_dir is replaced only once the new directory is complete.
    """
    out_dir = Path(out_dir)
    folded = sae.fold_input_scale()
    files = {WEIGHTS_FILE: _finite(folded.saelens_tensors(), "SAE")}
    scale = sae.input_scale.tolist()  # a crosscoder: one per model
    cfg_text = _cfg_json(folded, scale, metadata)
    if sparsity is not None:
        files[SPARSITY_FILE] = {"sparsity": _check_sparsity(sparsity, sae.config.d_sae)}
    _write_dir_atomically(out_dir, cfg_text, files)
    return out_dir


def _finite(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The tensors detached, on the CPU and contiguous, as safetensors writes them; NaN/inf ones refused."""
    out = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, tensor in out.items():
        if not bool(torch.isfinite(tensor).all()):
            raise SAELightningError(f"{what} tensor {name} has NaN/inf values; refusing to export "
                                    "(train with a lower lr or resume from an earlier checkpoint)")
    return out


def _json_text(cfg: dict, what: str) -> str:
    try:
        return json.dumps(_jsonable(cfg), indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise SAELightningError(f"{what} metadata cannot be written as JSON ({err}); "
                                "pass plain numbers, strings, lists and dicts") from None


def _cfg_json(sae: SAE, input_scale, metadata: dict | None) -> str:
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, **sae.metadata, **(metadata or {})}
    meta["saelightning_architecture"] = sae.config.architecture
    meta["saelightning_config"] = sae.config_dict()
    meta["input_scale_folded"] = input_scale  # raw activations were multiplied by this in training
    cfg = {
        "d_in": sae.config.d_in // sae.config.n_models,
        "d_sae": sae.config.d_sae,
        "dtype": sae.config.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.config.apply_b_dec_to_input,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        "metadata": meta,
        **sae.saelens_cfg(),
        "architecture": sae.saelens_architecture(),
    }
    if sae.config.architecture in CROSSCODERS:
        cfg["apply_b_dec_to_input"] = False  # the export's encoder bias has b_dec folded in
    if sae.config.is_transcoder:  # SAELens's TranscoderConfig keys; hook_name_out also in metadata, as it reads it
        cfg["architecture"] = TRANSCODER_NAMES[(cfg["architecture"], bool(sae.config.skip_connection))]
        cfg["d_out"] = sae.config.d_out
        if meta.get("hook_name_out"):
            cfg["hook_name_out"] = meta["hook_name_out"]
    return _json_text(cfg, "SAE")


def _jsonable(value):
    """Plain JSON values: paths as strings, 1-element tensors as numbers, NaN/inf (e.g. a metric not yet
    measured) as null, since strict JSON readers reject NaN."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_sparsity(sparsity: torch.Tensor, d_sae: int) -> torch.Tensor:
    sparsity = torch.as_tensor(sparsity).detach().to("cpu", torch.float32).contiguous()
    if sparsity.shape != (d_sae,):
        raise SAELightningError(f"sparsity has shape {tuple(sparsity.shape)}, expected ({d_sae},): "
                                "one log10 density per latent")
    if bool(torch.isnan(sparsity).any()) or bool((sparsity > 1e-6).any()):
        raise SAELightningError("sparsity must be log10 feature densities (<= 0, no NaN); "
                                "pass torch.log10(density + 1e-10)")
    return sparsity


def _write_dir_atomically(out_dir: Path, cfg_text: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """cfg.json and each safetensors file {name: tensors} in out_dir, which is replaced only once all are written."""
    with atomic_dir(out_dir) as tmp:
        (tmp / CFG_FILE).write_text(cfg_text)
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})


# --- cross-layer transcoders: circuit-tracer's file layout ---------------------------------------------------------

CLT_ARCHITECTURE = "cross_layer_transcoder"
# our architecture -> circuit-tracer's activation_function (batchtopk: the JumpReLU of its learned threshold; TopK
# has none there, "topk" is read by load_sae only), and back
CLT_ACTIVATIONS = {"relu": "relu", "jumprelu": "jump_relu", "batchtopk": "jump_relu", "topk": "topk"}
CLT_FROM_ACTIVATION = {"relu": "relu", "jump_relu": "jumprelu", "topk": "topk"}


def save_clt(clt: CrossLayerTranscoder, out_dir, metadata: dict | None = None,
             sparsity: torch.Tensor | None = None) -> Path:
    """Write a cross-layer transcoder (scales folded in) in circuit-tracer's layout: W_enc_{i}.safetensors with
    W_enc_{i} [d_sae, d], b_enc_{i}, b_dec_{i} [d] (layer i's output bias) and threshold_{i}; W_dec_{i}.safetensors
    with W_dec_{i} [d_sae, L - i, d] (layer i's latents to the outputs of layers i..L-1); cfg.json beside them."""
    out_dir = Path(out_dir)
    folded = clt.fold_scales()
    files: dict[str, dict[str, torch.Tensor]] = {}
    L, d, d_sae = clt.n_layers, clt.d, clt.config.d_sae
    for i, enc in enumerate(folded.encoders):
        t = enc.saelens_tensors()
        enc_file = {f"W_enc_{i}": t["W_enc"].T, f"b_enc_{i}": t["b_enc"], f"b_dec_{i}": folded.b_dec[i]}
        if "threshold" in t:
            enc_file[f"threshold_{i}"] = t["threshold"]
        files[f"W_enc_{i}.safetensors"] = _finite(enc_file, "CLT")
        files[f"W_dec_{i}.safetensors"] = _finite({f"W_dec_{i}": t["W_dec"].reshape(d_sae, L - i, d)}, "CLT")
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, **clt.metadata, **(metadata or {}),
            "saelightning_architecture": clt.config.architecture, "saelightning_config": asdict(clt.config),
            "input_scales_folded": clt.input_scales.tolist(), "output_scales_folded": clt.output_scales.tolist()}
    meta.setdefault("hook_name", clt.metadata.get("hook_names_in", [None])[0])
    cfg = {"architecture": CLT_ARCHITECTURE, "activation_function": CLT_ACTIVATIONS[clt.config.architecture],
           "n_layers": L, "d_model": d, "d_transcoder": d_sae, "d_in": d, "d_sae": d_sae,
           "dtype": clt.config.dtype, "feature_input_hook": "hook_mlp_in", "feature_output_hook": "hook_mlp_out",
           "skip_connection": False, "metadata": meta}
    if clt.config.architecture == "topk":
        cfg["k"] = clt.config.k
    cfg_text = _json_text(cfg, "CLT")
    if sparsity is not None:
        files[SPARSITY_FILE] = {"sparsity": _check_sparsity(sparsity, L * d_sae)}
    _write_dir_atomically(out_dir, cfg_text, files)
    return out_dir


def _load_clt(path: Path, cfg: dict) -> CrossLayerTranscoder:
    file = path / CFG_FILE
    missing = [k for k in ("n_layers", "d_model", "d_transcoder", "activation_function") if k not in cfg]
    if cfg.get("activation_function") == "topk" and "k" not in cfg:
        missing.append("k")
    if missing:
        raise SAELightningError(f"{file} lacks the key(s) {', '.join(missing)}; re-export the CLT")
    act = cfg["activation_function"]
    if act not in CLT_FROM_ACTIVATION or cfg.get("skip_connection"):
        raise SAELightningError(f"{file}: a CLT with activation_function {act!r}"
                                f"{' and a skip connection' if cfg.get('skip_connection') else ''} is not supported; "
                                f"saelightning reads {', '.join(CLT_FROM_ACTIVATION)} without skip")
    L, d, d_sae = int(cfg["n_layers"]), int(cfg["d_model"]), int(cfg["d_transcoder"])
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    try:
        config = SAEConfig(architecture=CLT_FROM_ACTIVATION[act], d_in=d, d_sae=d_sae, k=cfg.get("k"),
                           dtype=dtype if dtype in DTYPES else "float32")
        clt = CrossLayerTranscoder(config, L)
    except SAELightningError as err:
        raise SAELightningError(f"{file}: {err}") from None
    want = {}
    for i in range(L):
        want[f"W_enc_{i}.safetensors"] = {f"W_enc_{i}": (d_sae, d), f"b_enc_{i}": (d_sae,), f"b_dec_{i}": (d,),
                                          **({f"threshold_{i}": (d_sae,)} if act == "jump_relu" else {})}
        want[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": (d_sae, L - i, d)}
    got = {}
    for name, shapes in want.items():
        tensors = _read_tensors(path / name)
        for key, shape in shapes.items():
            if key not in tensors or tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
                raise SAELightningError(f"{path / name}: {key} missing or not a float tensor of shape {shape}; "
                                        "re-export the CLT")
            got[key] = tensors[key]
    with torch.no_grad():
        for i, enc in enumerate(clt.encoders):
            enc.W_enc.copy_(got[f"W_enc_{i}"].T)
            enc.b_enc.copy_(got[f"b_enc_{i}"])
            enc.W_dec.copy_(got[f"W_dec_{i}"].reshape(d_sae, (L - i) * d))
            if act == "jump_relu":
                enc.threshold.copy_(got[f"threshold_{i}"])
        clt.b_dec.copy_(torch.stack([got[f"b_dec_{i}"] for i in range(L)]))
    clt.metadata = dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}
    return clt


def load_sae(path, device=None, trainable: bool = False) -> SAE:
    """Read an SAE directory (ours or SAELens-written) into an SAE that works on raw activations.

    cfg.json's metadata is available as `sae.metadata`. The SAE is returned in eval mode with its parameters
    frozen (requires_grad False), as inference wants; trainable=True leaves them trainable (fine-tuning).
    """
    path = Path(path)
    if not path.is_dir():
        raise SAELightningError(f"no SAE directory at {path}; pass a directory with {CFG_FILE} and {WEIGHTS_FILE} "
                                "(as save_sae writes)")
    if not (path / CFG_FILE).exists() and (path / "config.json").exists() and (path / "model.safetensors").exists():
        sae = load_dictionary_learning(path, device)  # science-of-finetuning's crosscoder layout
        sae.requires_grad_(trainable)
        return sae
    cfg = _read_cfg(path / CFG_FILE)
    if cfg.get("architecture") == CLT_ARCHITECTURE:  # a cross-layer transcoder (save_clt)
        clt = _load_clt(path, cfg).eval().requires_grad_(trainable)
        return clt.to(device) if device is not None else clt
    cfg = _upgrade_pre6(cfg)
    sae = build_sae(_config_from_cfg(cfg, path / CFG_FILE))
    tensors = _read_tensors(path / WEIGHTS_FILE)
    sae.load_saelens_tensors(_check_tensors(tensors, sae, path / WEIGHTS_FILE))
    sae.metadata = dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}
    if sae.config.is_transcoder and cfg.get("hook_name_out") and not sae.metadata.get("hook_name_out"):
        sae.metadata["hook_name_out"] = cfg["hook_name_out"]  # SAELens 6.0-6.x kept it at the top level
    sae.eval().requires_grad_(trainable)
    return sae.to(device) if device is not None else sae


def load_dictionary_learning(path, device=None) -> SAE:
    """A crosscoder saved by science-of-finetuning's dictionary_learning (BatchTopKCrossCoder or CrossCoder), as a
    saelightning crosscoder that computes the same latents and reconstructions.

    path: a directory with config.json and model.safetensors (their Hugging Face upload), or a state dict file
    (torch.save of the module: loaded with weights_only=True, its config taken from the tensors' shapes and a
    config.json beside it when there is one). Keys: encoder.weight [M, d, F], encoder.bias [F], decoder.weight
    [M, F, d], decoder.bias [M, d], and for BatchTopK k and threshold (f_i·Σ_m‖d_i^m‖ > threshold; a threshold
    below 0, never set, is refused: that crosscoder has no inference rule but a batch's top k).
    """
    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    cfg = _read_cfg(cfg_file) if cfg_file.is_file() else {}
    if path.is_dir():
        weights = path / "model.safetensors"
        tensors = _read_tensors(weights)
    else:
        weights = path
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SAELightningError(f"cannot read {path} as a dictionary_learning state dict ({err}); "
                                    "give its directory (config.json + model.safetensors) or the .pt file") from None
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items() if k != "_hub_mixin_config"}
    need = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
    missing = [k for k in need if k not in tensors]
    if missing or tensors["encoder.weight"].dim() != 3:
        raise SAELightningError(f"{weights} is not a dictionary_learning CrossCoder (it lacks {missing or need}, with "
                                "encoder.weight [M, d, F]); load an SAE directory with load_sae instead")
    M, d, F = tensors["encoder.weight"].shape
    batch_topk = "threshold" in tensors or "k" in tensors or "k" in cfg
    if batch_topk:
        k = int(tensors["k"]) if "k" in tensors else int(cfg["k"])
        threshold = tensors.get("threshold")
        if threshold is None or threshold.numel() != 1 or float(threshold) < 0:
            raise SAELightningError(f"{weights}: its BatchTopK threshold is {threshold!r}, not one number >= 0 "
                                    "(never set, or per layer); saelightning reads crosscoders with one threshold")
        config = SAEConfig(architecture="crosscoder", d_in=M * d, d_sae=F, n_models=M, k=k)
    else:
        config = SAEConfig(architecture="crosscoder_l1", d_in=M * d, d_sae=F, n_models=M)
    sae = build_sae(config)
    ours = {name: tensors[name].float() for name in need}
    ours["folded_scale"] = torch.ones(M)
    if batch_topk:
        ours["threshold"] = tensors["threshold"].float().reshape(())
    sae.load_saelens_tensors(_check_tensors(ours, sae, weights))
    sae.metadata = {"loaded_from": str(path), "dictionary_learning_config": cfg}
    sae.eval().requires_grad_(False)
    return sae.to(device) if device is not None else sae


def read_metadata(path) -> dict:
    """cfg.json's "metadata" of an SAE directory, without reading its weights."""
    cfg = _upgrade_pre6(_read_cfg(Path(path) / CFG_FILE))
    return dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}


def load_sparsity(path) -> torch.Tensor | None:
    """log10 feature densities [d_sae] from an SAE directory's sparsity.safetensors, or None if absent."""
    file = Path(path) / SPARSITY_FILE
    if not file.exists():
        return None
    tensors = _read_tensors(file)
    if "sparsity" not in tensors or tensors["sparsity"].dim() != 1:
        raise SAELightningError(f"{file} has no 1-d tensor 'sparsity'; re-export the SAE or delete the file")
    return tensors["sparsity"]


def _read_cfg(file: Path) -> dict:
    if not file.is_file():
        raise SAELightningError(f"missing {file}; an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE} "
                                "(re-export it with save_sae)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAELightningError(f"{file} is not valid JSON ({err}); re-export the SAE") from None
    if not isinstance(cfg, dict):
        raise SAELightningError(f"{file} must hold a JSON object; re-export the SAE")
    return cfg


# top-level keys of SAELens < 6 configs that 6.x keeps under "metadata"
_PRE6_METADATA = ("model_name", "hook_name", "hook_point", "hook_layer", "hook_head_index", "context_size",
                  "dataset_path", "prepend_bos", "model_from_pretrained_kwargs", "neuronpedia_id")


def _upgrade_pre6(cfg: dict) -> dict:
    """SAELens < 6 wrote TopK as architecture "standard" with activation_fn "topk", and the metadata flat."""
    if isinstance(cfg.get("metadata"), dict):
        return cfg
    cfg = dict(cfg)
    cfg.setdefault("architecture", "standard")  # configs older than the gated/jumprelu SAEs had none
    cfg["metadata"] = {("hook_name" if key == "hook_point" else key): cfg[key] for key in _PRE6_METADATA if key in cfg}
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if activation == "topk" and cfg.get("architecture", "standard") == "standard":
        cfg["architecture"] = "topk"
        cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    elif activation not in (None, "relu"):
        raise SAELightningError(f"activation_fn {activation!r} of this SAELens config is not supported; "
                                "saelightning reads relu and topk")
    return cfg


def _config_from_cfg(cfg: dict, file: Path) -> SAEConfig:
    arch, skip, transcoder = cfg.get("architecture"), False, cfg.get("architecture") in FROM_TRANSCODER
    if transcoder:
        arch, skip = FROM_TRANSCODER[arch]
    missing = [key for key in ("d_in", "d_sae", "architecture") + (("d_out",) if transcoder else ()) if key not in cfg]
    if arch in ("topk", "crosscoder") and cfg.get("k") is None:
        missing.append("k")
    if missing:
        raise SAELightningError(f"{file} lacks the key(s) {', '.join(missing)}; re-export the SAE")
    if arch not in FROM_SAELENS:
        raise SAELightningError(f"{file}: unknown SAE architecture {arch!r}; "
                                f"saelightning reads {', '.join(list(FROM_SAELENS) + list(FROM_TRANSCODER))}")
    for key, allowed in (("normalize_activations", ("none", None, False)), ("reshape_activations", ("none", None)),
                         ("rescale_acts_by_decoder_norm", (False, None))):
        if cfg.get(key) not in allowed:
            raise SAELightningError(f"{file}: {key}={cfg.get(key)!r} is not supported; fold it into the weights first "
                                    "(SAELens: fold_activation_norm_scaling_factor / fold_W_dec_norm)")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SAELightningError(f"{file}: dtype {cfg.get('dtype')!r} is not supported; use one of {', '.join(DTYPES)}")
    fields = {"architecture": FROM_SAELENS[arch], "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": dtype,
              "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", not transcoder))}
    if transcoder:
        fields.update(d_out=cfg["d_out"], skip_connection=skip)
    if arch in ("topk", "crosscoder"):
        fields["k"] = cfg["k"]
    if arch in CROSSCODERS:
        n = cfg.get("n_models")
        if not isinstance(n, int) or n < 2:
            raise SAELightningError(f"{file}: a crosscoder's n_models must be an integer >= 2, got {n!r}; re-export it")
        fields.update(d_in=cfg["d_in"] * n, n_models=n, apply_b_dec_to_input=False)
    try:
        return SAEConfig(**fields)
    except SAELightningError as err:
        raise SAELightningError(f"{file}: {err}") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise SAELightningError(f"missing {file}; re-export the SAE (save_sae writes it)")
    try:
        return load_file(str(file), device="cpu")
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SAELightningError(f"{file} is truncated or corrupt ({reason}); re-export the SAE") from None


def _check_tensors(tensors: dict, sae: SAE, file: Path) -> dict[str, torch.Tensor]:
    expected = sae.saelens_shapes()
    scaling = tensors.pop("scaling_factor", None)  # old SAELens files carry an all-ones one
    if scaling is not None and not bool((scaling == 1).all()):
        raise SAELightningError(f"{file} has a scaling_factor that is not 1; "
                                "fold it into the weights with SAELens first")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SAELightningError(f"{file}: tensors missing {missing} / unexpected {unexpected} for architecture "
                                f"{sae.saelens_architecture()}; re-export the SAE")
    dtype = sae.W_enc.dtype
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SAELightningError(f"{file}: tensor {name} has shape {tuple(tensor.shape)} "
                                    f"but cfg.json implies {shape}; the files do not belong together")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise SAELightningError(f"{file}: tensor {name} must be finite floating point (got {tensor.dtype}); "
                                    "re-export the SAE")
    return {name: tensors[name].to(dtype) for name in expected}
