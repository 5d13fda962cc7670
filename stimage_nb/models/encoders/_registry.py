"""The registry: one :class:`Encoder` entry per published pathology foundation encoder.

Every value below comes from the encoder's public model card, configuration file or reference code
(cited per entry in ``source``/``notes``); where a card leaves a value open (the magnification of a
vision-language model, the output pooling of a distilled model) the entry says so in ``notes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import StimageInputError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

#: How the encoder's output becomes one feature vector per tile.
OUTPUTS = {
    "cls": "the class token after the final norm (timm global_pool='token')",
    "cls+patch_mean": "the class token concatenated with the mean of the patch tokens (registers excluded)",
    "avg": "the mean over the final feature map after the final norm (Swin)",
    "attn_pool": "CoCa's contrastive attentional pooler (one query) + LayerNorm, before the projection "
                 "(CONCH's encode_image(proj_contrast=False, normalize=False))",
}
#: The key layouts published checkpoints come in (converted to timm's on loading).
LAYOUTS = {
    "timm": "timm VisionTransformer state dict (what timm.create_model('hf-hub:...') loads)",
    "swin_v0.5": "timm 0.5.4 SwinTransformer with a ConvStem (downsample at the end of a stage, relative_position_index "
                 "and attn_mask buffers; ctranspath.pth stores it under 'model')",
    "hf_dinov2": "Hugging Face transformers Dinov2Model (embeddings.*, encoder.layer.N.*, layernorm.*)",
    "conch_coca": "the whole CONCH CoCa model (visual.trunk.*, visual.attn_pool_contrast.*, visual.ln_contrast.*, text.*)",
}


@dataclass(frozen=True)
class Encoder:
    """One published encoder: how to build it in timm, how to feed it, and where its weights come from.

    Attributes
    ----------
    name
        Registry name used on the command line (``--backbone uni``); ``aliases`` also resolve.
    architecture
        timm model name of the trunk; ``kwargs`` are its :func:`timm.create_model` arguments (JSON
        values; layer classes by name: ``"swiglu_packed"`` = :class:`timm.layers.SwiGLUPacked`,
        ``"silu"`` = :class:`torch.nn.SiLU`).
    builder
        ``"timm"`` (the timm model itself), ``"ctranspath"`` (timm's Swin with CTransPath's
        convolutional stem) or ``"conch"`` (a timm ViT trunk + CoCa's attentional pooler).
    input_px, um_per_px
        The tile side in pixels the encoder was trained on and the resolution (µm per pixel) of those
        pixels; tiles are ``input_px * um_per_px`` µm wide unless the user overrides them.
    mean, std
        Input normalisation of RGB values in [0, 1].
    output, feature_dim
        The pooling (:data:`OUTPUTS`) and the length of the resulting feature vector.
    layout
        The key layout of the published checkpoint (:data:`LAYOUTS`).
    hf_hub_id, weights_files, source
        Where the weights come from (Hugging Face repository, its weight file names, other sources).
    licence, gated
        Licence of the weights and whether the download needs an approved access request.
    params_card
        The parameter count as the model card or paper states it (rounded).
    """

    name: str
    title: str
    architecture: str
    kwargs: dict[str, Any]
    input_px: int
    um_per_px: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str
    feature_dim: int
    layout: str
    hf_hub_id: str | None
    weights_files: tuple[str, ...]
    source: str
    licence: str
    gated: bool
    params_card: str
    reference: str
    builder: str = "timm"
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tile_um(self) -> float:
        """Tile side in µm at the encoder's own resolution (``input_px * um_per_px``)."""
        return float(self.input_px) * float(self.um_per_px)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile_um"] = self.tile_um
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["weights_files"], d["aliases"] = list(self.weights_files), list(self.aliases)
        return d


_VIT_GIANT_SWIGLU = "SwiGLU MLP: 2 x 4096 gated units (mlp_ratio 2.66667 x 2 with timm's packed SwiGLU)"

ENCODERS: dict[str, Encoder] = {e.name: e for e in [
    Encoder(
        name="uni", title="UNI", architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="cls", feature_dim=1024,
        layout="timm", hf_hub_id="MahmoodLab/UNI", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/MahmoodLab/UNI (model card: timm.create_model('vit_large_patch16_224', "
               "img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True))",
        licence="CC-BY-NC-ND-4.0 (non-commercial, no derivatives)", gated=True, params_card="ViT-L/16, ~0.3B",
        reference="Chen et al., Nat Med 2024", aliases=("uni1", "uni_v1"),
        notes="DINOv2 ViT-L/16 pretrained on Mass-100K at 20x (0.5 µm/px)."),
    Encoder(
        name="uni2-h", title="UNI2-h", architecture="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 5.33334, "no_embed_class": True, "mlp_layer": "swiglu_packed",
                "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="cls", feature_dim=1536,
        layout="timm", hf_hub_id="MahmoodLab/UNI2-h", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/MahmoodLab/UNI2-h (model card timm_kwargs: vit_giant_patch14_224, depth 24, "
               "24 heads, embed_dim 1536, mlp_ratio 2.66667*2, SwiGLUPacked + SiLU, 8 register tokens, no_embed_class)",
        licence="CC-BY-NC-ND-4.0 (non-commercial, no derivatives)", gated=True, params_card="ViT-H/14 + 8 registers, 681M",
        reference="Chen et al., Nat Med 2024 (UNI2 release, 2025)", aliases=("uni2", "uni_v2", "uni2h"),
        notes=_VIT_GIANT_SWIGLU + "."),
    Encoder(
        name="conch", title="CONCH (image tower)", architecture="vit_base_patch16_224", builder="conch",
        kwargs={"img_size": 448, "dynamic_img_size": True, "pool_dim": 512, "pool_heads": 8},
        input_px=448, um_per_px=0.5, mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], output="attn_pool", feature_dim=512,
        layout="conch_coca", hf_hub_id="MahmoodLab/CONCH", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/MahmoodLab/CONCH; architecture from CONCH's coca_model.py: a timm "
               "VisionTransformer (embed 768, depth 12, 12 heads, mlp 4, patch 16, img_size 448) whose "
               "forward_features tokens go through AttentionalPooler(d_model 512, context 768, 8 heads, 1 query) "
               "and a LayerNorm",
        licence="CC-BY-NC-ND-4.0 (non-commercial, no derivatives)", gated=True,
        params_card="ViT-B/16 image encoder (~90M of the CoCa model)", reference="Lu et al., Nat Med 2024",
        aliases=("conch_v1", "conch1"),
        notes="Built from timm + torch.nn.MultiheadAttention to reproduce CONCH's encode_image(proj_contrast=False, "
              "normalize=False) exactly; the text tower, caption pooler and contrastive projection in the "
              "checkpoint are ignored. A vision-language model trained on PubMed/educational figures: its "
              "magnification is not fixed by training; 20x (0.5 µm/px) at 448 px is the setting of its model card "
              "and of TRIDENT."),
    Encoder(
        name="h-optimus-0", title="H-optimus-0", architecture="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=HOPTIMUS[0], std=HOPTIMUS[1], output="cls", feature_dim=1536,
        layout="timm", hf_hub_id="bioptimus/H-optimus-0", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/bioptimus/H-optimus-0 (config.json: vit_giant_patch14_reg4_dinov2, input 224, "
               "mean/std as here) and the public checkpoint https://public-bioptimus-eu-west-3.s3.eu-west-3.amazonaws.com/"
               "h-optimus-v0/checkpoint.pth (same keys)",
        licence="Apache-2.0", gated=False, params_card="1.1B", reference="Saillard et al., 2024 (bioptimus/releases)",
        aliases=("hoptimus0", "h_optimus_0", "hoptimus-0"),
        notes="ViT-g/14 with 4 registers, " + _VIT_GIANT_SWIGLU + "; model card: 224 x 224 tiles at 0.5 µm/px."),
    Encoder(
        name="h-optimus-1", title="H-optimus-1", architecture="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=HOPTIMUS[0], std=HOPTIMUS[1], output="cls", feature_dim=1536,
        layout="timm", hf_hub_id="bioptimus/H-optimus-1", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/bioptimus/H-optimus-1 (model card: timm.create_model('hf-hub:bioptimus/"
               "H-optimus-1', init_values=1e-5, dynamic_img_size=False); same architecture and normalisation as "
               "H-optimus-0)",
        licence="Bioptimus' terms, access on request (see the model card)", gated=True, params_card="1.1B",
        reference="Bioptimus, 2025", aliases=("hoptimus1", "h_optimus_1", "hoptimus-1"),
        notes="Same architecture as H-optimus-0, trained on more than 1M slides; 224 px at 0.5 µm/px."),
    Encoder(
        name="h0-mini", title="H0-mini", architecture="vit_base_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334, "mlp_layer": "swiglu_packed",
                "act_layer": "silu", "global_pool": "", "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=HOPTIMUS[0], std=HOPTIMUS[1], output="cls+patch_mean", feature_dim=1536,
        layout="timm", hf_hub_id="bioptimus/H0-mini", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/bioptimus/H0-mini (model card: mlp_layer=SwiGLUPacked, act_layer=SiLU; output "
               "(1, 261, 768) = CLS + 4 registers + 256 patches; concatenated CLS and mean patch tokens, 1536) and "
               "Owkin's plism-benchmark (vit_base_patch14_reg4_dinov2, img_size 224, init_values 1e-5, DINOv2 fused "
               "SwiGLU with mlp_ratio 4, H-optimus mean/std)",
        licence="CC-BY-NC-ND-4.0 (non-commercial, no derivatives)", gated=True, params_card="ViT-B/14, 86M",
        reference="Filiot et al., 2025 (arXiv:2501.16239)", aliases=("h0mini", "h0_mini"),
        notes="DINOv2's fused SwiGLU with mlp_ratio 4 has 2 x 2048 gated units, i.e. timm's packed SwiGLU with "
              "hidden 4096 = mlp_ratio 5.33334 (86M parameters, as the card states; the hub config.json, when "
              "given with the weights, takes precedence). Distilled from H-optimus-0 on 224 px tiles at 0.5 µm/px."),
    Encoder(
        name="virchow2", title="Virchow2", architecture="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"},
        input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="cls+patch_mean", feature_dim=2560,
        layout="timm", hf_hub_id="paige-ai/Virchow2", weights_files=("pytorch_model.bin", "model.safetensors"),
        source="https://huggingface.co/paige-ai/Virchow2 (config.json: vit_huge_patch14_224, reg_tokens 4, mlp_ratio "
               "5.3375, global_pool ''; card: mlp_layer=SwiGLUPacked, act_layer=SiLU; embedding = concat(class "
               "token, mean of patch tokens 5:), 2560)",
        licence="CC-BY-NC-ND-4.0 (non-commercial, no derivatives)", gated=True, params_card="ViT-H/14, 632M",
        reference="Zimmermann et al., 2024 (arXiv:2408.00738)", aliases=("virchow_v2", "virchow-2"),
        notes="Trained on mixed magnifications (5x-40x); 20x (0.5 µm/px) at 224 px is the card's setting."),
    Encoder(
        name="phikon-v2", title="Phikon-v2", architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="cls", feature_dim=1024,
        layout="hf_dinov2", hf_hub_id="owkin/phikon-v2", weights_files=("model.safetensors",),
        source="https://huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, ViT-L/16, CLS of last_hidden_state; "
               "PANCAN-XL at 20x)",
        licence="Owkin non-commercial licence", gated=False, params_card="ViT-L/16, ~0.3B",
        reference="Filiot et al., 2024 (arXiv:2409.09173)", aliases=("phikon2", "phikon_v2"),
        notes="The Hugging Face Dinov2 checkpoint is remapped onto timm's ViT-L/16 with LayerScale (fused qkv); "
              "identical at the native 224 px (transformers interpolates position embeddings with its own bicubic "
              "variant at other sizes, timm with its own)."),
    Encoder(
        name="prov-gigapath", title="Prov-GigaPath (tile encoder)", architecture="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True},
        input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="cls", feature_dim=1536,
        layout="timm", hf_hub_id="prov-gigapath/prov-gigapath", weights_files=("pytorch_model.bin",),
        source="https://huggingface.co/prov-gigapath/prov-gigapath (config.json model_args: vit_giant_patch14_dinov2 "
               "with patch_size 16, embed_dim 1536, depth 40, 24 heads, init_values 1e-5, mlp_ratio 5.33334)",
        licence="Apache-2.0; gated (accept the terms on Hugging Face)", gated=True, params_card="1.1B",
        reference="Xu et al., Nature 2024", aliases=("gigapath", "prov_gigapath"),
        notes="ViT-g/16, " + _VIT_GIANT_SWIGLU + "; tiles of 256 px at 0.5 µm/px centre-cropped to 224 in the card."),
    Encoder(
        name="ctranspath", title="CTransPath", architecture="swin_tiny_patch4_window7_224", builder="ctranspath",
        kwargs={}, input_px=224, um_per_px=0.5, mean=IMAGENET[0], std=IMAGENET[1], output="avg", feature_dim=768,
        layout="swin_v0.5", hf_hub_id=None, weights_files=("ctranspath.pth",),
        source="https://github.com/Xiyue-Wang/TransPath (ctranspath.pth; also MahmoodLab/hest-bench fm_v1/ctranspath and "
               "the Path2Space weights); timm's swin_tiny_patch4_window7_224 with the convolutional stem "
               "ConvStem(3x3 s2 conv-BN-ReLU x2 + 1x1 conv)",
        licence="GPL-3.0 (TransPath repository)", gated=False, params_card="Swin-T + ConvStem, ~28M",
        reference="Wang et al., Med Image Anal 2022", aliases=("ctrans", "transpath"),
        notes="The timm 0.5.4 checkpoint (downsample at the end of a stage, saved relative_position_index and "
              "attn_mask buffers) is converted with timm's own Swin checkpoint filter. Trained on TCGA and PAIP; the "
              "paper does not fix one resolution: 0.5 µm/px is how HEST-Benchmark evaluates it; Path2Space uses "
              "100 µm at 224 px (0.45 µm/px)."),
]}

_ALIASES = {a: e.name for e in ENCODERS.values() for a in (e.name, *e.aliases)}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def list_encoders() -> list[Encoder]:
    """Every registered encoder, in registry order."""
    return list(ENCODERS.values())


def find_encoder(name: str | None) -> Encoder | None:
    """The entry for a registry name, alias or Hugging Face id (``"uni"``, ``"hf-hub:MahmoodLab/UNI"``,
    ``"bioptimus/H-optimus-0"``); ``None`` when ``name`` is none of them (e.g. a plain timm name)."""
    if not name:
        return None
    n = str(name).strip()
    if n.lower().startswith(("hf-hub:", "hf_hub:")):
        n = n[7:]
    if "/" in n:
        for e in ENCODERS.values():
            if e.hf_hub_id and e.hf_hub_id.lower() == n.lower():
                return e
        return None
    key = _norm(n)
    for a, target in _ALIASES.items():
        if _norm(a) == key:
            return ENCODERS[target]
    return None


def get_encoder(name: str) -> Encoder:
    """Like :func:`find_encoder`, but an unknown name is a :class:`~stimage_nb.errors.StimageInputError`."""
    e = find_encoder(name)
    if e is None:
        raise StimageInputError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)} "
                                "(`stimage-nb encoders` lists them).")
    return e
