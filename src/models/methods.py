"""Methods: what a run trains on the frozen UNet and how the control reaches it (the `method/` config group).

`OFTControlModule` trains every method the same way (loss, loop, callbacks, checkpoints, resume, sampling);
what varies is a `Method` object, chosen by `method=<name>`:

| `method=` | trained | the control enters the UNet |
|---|---|---|
| `oft_control` (default) | control encoder + OFT rotations of the `oft/` targets | encoder output added to `conv_in` |
| `encoder_only` | control encoder alone (the frozen UNet as it is) | as above |
| `lora` | control encoder + peft LoRA on the same layers as the `oft/` targets | as above |
| `full_finetune` | control encoder + every UNet weight | as above |
| `controlnet` | diffusers `ControlNetModel.from_unet` (a trainable copy of the encoder half) | down/mid residuals |
| `t2i_adapter` | diffusers `T2IAdapter` (full adapter) | `down_intrablock_additional_residuals` |

A method builds its trainable parts on the module (`build`, registering them as the module's submodules:
`encoder`, `controlnet` or `adapter`), installs its control for the UNet calls of a block (`inject`, used
by training and by sampling alike), splits its parameters into the `encoder` group (what reads the
condition image: the control encoder, ControlNet's hint encoder; lr `optim.lr`) and the `adapter` group
(everything else it trains; lr `method.adapter_lr`; with none set, the module gives the optimizer one group
at `optim.lr`), names what a checkpoint must match
(`identity`) and saves a trained run in its own ecosystem's format (`save_ecosystem`). Every method is the
base model at step 0: the control encoder's last convolution, LoRA's `B`, ControlNet's zero convolutions
and the OFT skew parameters start at zero, and the T2I-Adapter here starts with its input convolution and
every bias at zero, so all its features are zero until the first step (its weights keep their random
init, so the first step's gradient reaches every level through the residual paths).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from src.errors import ConfigError
from src.models.control import (
    ControlEncoder,
    ControlPyramid,
    _broadcast_to_batch,
    control_injection,
    multiscale_injection,
)
from src.models.multi import MultiEncoder, is_multi, split_condition
from src.oft import OFTConfig, batched_rotations, inject_oft, oft_parameter_count, project_coft_
from src.oft.inject import target_layers

if TYPE_CHECKING:
    from src.models.module import OFTControlModule
    from src.models.run import TrainedRun

#: the method of checkpoints written before methods existed, and of modules built without one
DEFAULT_METHOD = "oft_control"
#: the record `save_ecosystem` writes beside the formats (method identity, condition, resolution, formats)
ECOSYSTEM_INFO = "method.json"


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


class Method:
    """What a run trains and how its control enters the frozen UNet (see the module docstring).

    Args:
        adapter_lr: learning rate of the `adapter` parameter group (null: `optim.lr`, as the encoder).
    """

    name: ClassVar[str] = ""
    #: whether the OFT layout (`oft/` group) decides which tensors exist (the checkpoint identity holds it)
    rotations: ClassVar[bool] = False

    def __init__(self, adapter_lr: float | None = None) -> None:
        if adapter_lr is not None and not float(adapter_lr) > 0:
            raise ConfigError(f"method.adapter_lr {adapter_lr} must be > 0, or null for optim.lr")
        self.adapter_lr = None if adapter_lr is None else float(adapter_lr)
        self.parts: dict[str, nn.Module] = {}  # the trainable modules this method registered on the module
        self.unet: nn.Module | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity(None)})"

    # ------------------------------------------------------------------------------------ building
    def check(self, unet_skeleton: nn.Module, oft: OFTConfig) -> None:
        """Fail before weights load if the method cannot adapt this UNet layout (built on the meta device)."""

    #: whether a task of several conditions (`canny+seg`) trains: one control encoder per condition
    multi_condition: ClassVar[bool] = False
    #: whether the control encoder alone carries the method's control (what the encoder formats export)
    encoder_holds_control = True

    def check_condition(self, condition: str) -> None:
        """Refuse (one line) a task of several conditions for a method that reads one condition image."""
        if is_multi(condition) and not self.multi_condition:
            raise ConfigError(
                f"method={self.name} reads one condition but task.condition is '{condition}': train it on one "
                "condition, or use oft_control, encoder_only, lora or full_finetune (one encoder per condition)"
            )

    def build(self, module: OFTControlModule) -> list[str]:
        """Add the trainable parts to `module` (whose `unet` is the frozen backbone UNet); returns the names of
        the UNet layers adapted in place (empty when the UNet stays as it is)."""
        raise NotImplementedError

    def _attach(self, module: nn.Module, name: str, part: nn.Module) -> nn.Module:
        if name in self.parts:
            raise RuntimeError(f"method {self.name} was already built (one Method object per module)")
        setattr(module, name, part)  # a submodule: in the module's state dict, devices, DDP and precision
        self.parts[name] = part
        return part

    # ------------------------------------------------------------------------------------ the control
    def inject(
        self, unet: nn.Module, condition: torch.Tensor, strength: float = 1.0
    ) -> AbstractContextManager:
        """Install the control of `condition` ([B, 3, H, W] in [0, 1]) on `unet` for every call in the block;
        `strength` scales it (0: not installed, the output is the adapted UNet's alone)."""
        raise NotImplementedError

    def to(self, device: str | torch.device) -> Method:
        for part in self.parts.values():
            part.to(device)
        return self

    # ------------------------------------------------------------------------------------ optimisation
    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters that read the condition image (lr `optim.lr`)."""
        return []

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every other trained parameter (lr `method.adapter_lr`, default `optim.lr`)."""
        return []

    def param_groups(self) -> list[dict[str, Any]]:
        """Named optimizer parameter groups (empty groups left out); `adapter` carries `adapter_lr` if set."""
        groups = []
        for name, params in (("encoder", self.encoder_parameters()), ("adapter", self.adapter_parameters())):
            if params:
                lr = {"lr": self.adapter_lr} if name == "adapter" and self.adapter_lr is not None else {}
                groups.append({"params": params, "name": name, **lr})
        return groups

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (OFT's COFT projection)."""

    def parameter_summary(self) -> dict[str, int]:
        return {
            "encoder_params": _count(self.encoder_parameters()),
            "adapter_params": _count(self.adapter_parameters()),
        }

    # ------------------------------------------------------------------------------------ identity
    def settings(self) -> dict[str, Any]:
        """The method's settings that change which tensors exist or what they mean (checkpoint identity)."""
        return {}

    def identity(self, oft: OFTConfig | None) -> dict[str, Any]:
        """`{"name": ..., **settings}`: what a checkpoint of this method must match to be loaded."""
        return {"name": self.name, **self.settings()}

    # ------------------------------------------------------------------------------------ ecosystem
    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        """Write the trained parts in their ecosystem's formats under `folder`; returns `{format: folder}`."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- encoder-based
class EncoderOnly(Method):
    """The control encoder alone, added at `conv_in` of the frozen UNet (`method=encoder_only`).

    The base of the methods that share the encoder (OFT-Control, LoRA, full finetuning): they add what
    they train in the UNet through `adapt`.
    """

    name = "encoder_only"

    multi_condition = True

    def build(self, module: OFTControlModule) -> list[str]:
        self.unet = module.unet
        adapted = self.adapt(module)

        def encoder() -> ControlEncoder:
            return ControlEncoder(
                module.unet.conv_in.out_channels,
                module.vae_scale_factor,
                module.encoder_channels,
                stem=module.encoder_stem,
            )

        names = split_condition(module.condition)  # several: one encoder each (src.models.multi)
        control = MultiEncoder({name: encoder() for name in names}) if len(names) > 1 else encoder()
        self.encoder = self._attach(module, "encoder", control)
        return adapted

    def adapt(self, module: OFTControlModule) -> list[str]:
        """Make the UNet's own trainable part, in place; returns the adapted layer names."""
        return []

    def inject(
        self, unet: nn.Module, condition: torch.Tensor, strength: float = 1.0
    ) -> AbstractContextManager:
        return control_injection(unet, self.encoder, condition, strength)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad] if self.unet is not None else []

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        from src.models.exported import ENCODER_DIR, export_control_encoder

        return {"control_encoder": export_control_encoder(run, folder / ENCODER_DIR)}


class OFTControl(EncoderOnly):
    """OFT-Control (`method=oft_control`): OFT rotations of the `oft/` targets plus the control encoder.

    Args:
        multiscale: also add zero-initialised control features at the end of every down block
            (`src.models.control.ControlPyramid`), read from the encoder's last hidden map.
    """

    name = "oft_control"
    rotations = True

    def __init__(self, adapter_lr: float | None = None, multiscale: bool = False) -> None:
        super().__init__(adapter_lr)
        self.multiscale = bool(multiscale)
        self.encoder_holds_control = not self.multiscale  # the pyramid's heads are control too

    def check_condition(self, condition: str) -> None:
        if self.multiscale and is_multi(condition):
            raise ConfigError(
                f"method.multiscale=true reads one condition but task.condition is '{condition}': "
                "set method.multiscale=false for several conditions"
            )

    def settings(self) -> dict[str, Any]:
        return {"multiscale": True} if self.multiscale else {}  # off: the identity of earlier checkpoints

    def build(self, module: OFTControlModule) -> list[str]:
        self.check_condition(str(module.condition))
        adapted = super().build(module)
        if self.multiscale:
            width = self.encoder.zero_out.in_channels
            pyramid = ControlPyramid(width, list(module.unet.config.block_out_channels))
            self.pyramid = self._attach(module, "pyramid", pyramid)
        return adapted

    @contextmanager
    def inject(self, unet: nn.Module, condition: torch.Tensor, strength: float = 1.0) -> Iterator[None]:
        """The control, and the rotations computed once for the block (`batched_rotations`)."""
        if self.multiscale:
            control = multiscale_injection(unet, self.encoder, self.pyramid, condition, strength)
        else:
            control = super().inject(unet, condition, strength)
        with batched_rotations(unet), control:
            yield

    def encoder_parameters(self) -> list[nn.Parameter]:
        pyramid = list(self.pyramid.parameters()) if self.multiscale else []
        return super().encoder_parameters() + pyramid

    def check(self, unet_skeleton: nn.Module, oft: OFTConfig) -> None:
        inject_oft(unet_skeleton, oft)  # targets and block sizes against the real layout

    def adapt(self, module: OFTControlModule) -> list[str]:
        self.coft = module.oft_config.coft
        return inject_oft(module.unet, module.oft_config)

    def after_optimizer_step(self) -> None:
        if self.coft:
            project_coft_(self.unet)  # COFT: every rotation block back inside its radius

    def parameter_summary(self) -> dict[str, int]:
        return {"oft_dof": oft_parameter_count(self.unet), **super().parameter_summary()}

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        from src.models.exported import export_peft

        return {"peft": export_peft(run, folder / "peft"), **super().save_ecosystem(run, folder)}


class LoRA(EncoderOnly):
    """peft LoRA on the layers the `oft/` group targets, plus the control encoder (`method=lora`).

    Args:
        rank: LoRA rank `r`.
        alpha: LoRA alpha (null: `rank`, i.e. scale 1).
        dropout: dropout on the LoRA branch's input.
    """

    name = "lora"

    def __init__(
        self, rank: int = 4, alpha: float | None = None, dropout: float = 0.0, adapter_lr: float | None = None
    ) -> None:
        super().__init__(adapter_lr)
        if int(rank) < 1:
            raise ConfigError(f"method.rank {rank} must be >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"method.dropout {dropout} is not a probability in [0, 1)")
        self.rank, self.dropout = int(rank), float(dropout)
        self.alpha = float(rank if alpha is None else alpha)

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    def identity(self, oft: OFTConfig | None) -> dict[str, Any]:
        layers = (
            {} if oft is None else {"targets": list(oft.target_modules), "exclude": list(oft.exclude_modules)}
        )
        return {**super().identity(oft), **layers}

    def check(self, unet_skeleton: nn.Module, oft: OFTConfig) -> None:
        target_layers(unet_skeleton, oft)

    def lora_config(self, layers: list[str], **options: Any):
        import peft

        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=sorted(layers),
            **options,
        )

    def adapt(self, module: OFTControlModule) -> list[str]:
        import peft

        self.layers = target_layers(module.unet, module.oft_config)
        peft.inject_adapter_in_model(self.lora_config(self.layers), module.unet)
        return self.layers

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        """`peft/`: a LoRA adapter for the base UNet (`PeftModel.from_pretrained(unet, folder / "peft")`)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from src.models.backbone import check_backbone

        target = folder / "peft"
        target.mkdir(parents=True, exist_ok=True)
        base = check_backbone(run.module.backbone_spec)
        self.lora_config(self.layers, inference_mode=True, base_model_name_or_path=base).save_pretrained(
            str(target)
        )
        state = get_peft_model_state_dict(self.unet)
        save_file(
            {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
            target / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        return {"peft": target, **super().save_ecosystem(run, folder)}


class FullFinetune(EncoderOnly):
    """Every UNet weight trainable, plus the control encoder (`method=full_finetune`)."""

    name = "full_finetune"

    def adapt(self, module: OFTControlModule) -> list[str]:
        module.unet.requires_grad_(True).train()  # trained, so in train mode (its dropout is SD's 0)
        return []

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        """`unet/`: the finetuned UNet (`UNet2DConditionModel.from_pretrained`), plus the control encoder."""
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        return {"unet": folder / "unet", **super().save_ecosystem(run, folder)}


# ---------------------------------------------------------------------------------------- residual-based
def _pre_hook(unet: nn.Module, extra: Any) -> AbstractContextManager:
    """A context installing a forward pre-hook on `unet` that adds `extra(args, kwargs)` to its keywords."""

    @contextmanager
    def installed() -> Iterator[None]:
        def hook(_unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, **extra(args, kwargs)}

        handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return installed()


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """A UNet forward argument given by position or keyword."""
    return args[index] if len(args) > index else kwargs[name]


class ControlNet(Method):
    """diffusers `ControlNetModel.from_unet` on the frozen UNet (`method=controlnet`).

    Its down and mid residuals enter the frozen UNet at every call (both branches of classifier-free
    guidance, as diffusers' pipelines do); `strength` is its `conditioning_scale`.

    Args:
        conditioning_channels: widths of ControlNet's hint encoder (`conditioning_embedding_out_channels`;
            one stride-2 stage per width after the first, 3 for SD's factor 8).
    """

    name = "controlnet"

    def __init__(
        self, conditioning_channels: tuple[int, ...] = (16, 32, 96, 256), adapter_lr: float | None = None
    ) -> None:
        super().__init__(adapter_lr)
        self.conditioning_channels = [int(c) for c in conditioning_channels]

    def settings(self) -> dict[str, Any]:
        return {"conditioning_channels": list(self.conditioning_channels)}

    def build(self, module: OFTControlModule) -> list[str]:
        from diffusers import ControlNetModel

        stages = len(self.conditioning_channels) - 1
        if 2**stages != module.vae_scale_factor:
            raise ConfigError(
                f"method.conditioning_channels {self.conditioning_channels} give {stages} stride-2 stages "
                f"but the VAE downscales by {module.vae_scale_factor}: give "
                f"{module.vae_scale_factor.bit_length()} widths"
            )
        self.unet = module.unet
        net = ControlNetModel.from_unet(
            module.unet, conditioning_embedding_out_channels=tuple(self.conditioning_channels)
        )
        self.controlnet = self._attach(module, "controlnet", net.requires_grad_(True).train())
        return []

    def inject(
        self, unet: nn.Module, condition: torch.Tensor, strength: float = 1.0
    ) -> AbstractContextManager:
        if strength == 0:
            return nullcontext()
        net = self.controlnet

        def residuals(args: tuple, kwargs: dict) -> dict[str, Any]:
            sample = args[0] if args else kwargs["sample"]
            down, mid = net(
                sample,
                _argument(args, kwargs, 1, "timestep"),
                encoder_hidden_states=_argument(args, kwargs, 2, "encoder_hidden_states"),
                added_cond_kwargs=kwargs.get("added_cond_kwargs"),  # SDXL: pooled text and time ids
                controlnet_cond=_broadcast_to_batch(condition, sample.shape[0]).to(net.dtype),
                conditioning_scale=strength,
                return_dict=False,
            )
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return _pre_hook(unet, residuals)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.controlnet.controlnet_cond_embedding.parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        embedding = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.controlnet.parameters() if id(p) not in embedding]

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        """`controlnet/`: `ControlNetModel.from_pretrained(folder / "controlnet")`, e.g. for diffusers'
        `StableDiffusionControlNetPipeline` over the base model."""
        self.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
        return {"controlnet": folder / "controlnet"}


class T2IAdapter(Method):
    """diffusers `T2IAdapter` (full adapter) whose features enter the frozen UNet's down blocks
    (`method=t2i_adapter`); computed once per condition, scaled by `strength`.

    Args:
        channels: one feature width per UNet down block (null: the UNet's `block_out_channels`, which the
            features must match).
        num_res_blocks: residual blocks per level.
    """

    name = "t2i_adapter"

    def __init__(
        self,
        channels: tuple[int, ...] | None = None,
        num_res_blocks: int = 2,
        adapter_lr: float | None = None,
    ) -> None:
        super().__init__(adapter_lr)
        self.channels = None if channels is None else [int(c) for c in channels]
        self.num_res_blocks = int(num_res_blocks)

    def settings(self) -> dict[str, Any]:
        return {"channels": self.channels, "num_res_blocks": self.num_res_blocks}

    def check(self, unet_skeleton: nn.Module, oft: OFTConfig) -> None:
        if unet_skeleton.config.get("addition_embed_type") == "text_time":
            raise ConfigError(
                "method=t2i_adapter builds SD1/SD2's full adapter, whose features do not fit an SDXL UNet "
                "(diffusers' SDXL adapter is another layout): use method=controlnet or oft_control with "
                "model=sdxl"
            )

    def build(self, module: OFTControlModule) -> list[str]:
        from diffusers import T2IAdapter as Adapter

        levels = list(module.unet.config.block_out_channels)
        channels = self.channels or levels
        if len(channels) != len(levels):
            raise ConfigError(
                f"method.channels {channels} give {len(channels)} feature levels but the UNet has "
                f"{len(levels)} down blocks {levels}: give one width per block (null: the UNet's own)"
            )
        self.unet = module.unet
        adapter = Adapter(
            in_channels=3,
            channels=channels,
            num_res_blocks=self.num_res_blocks,
            downscale_factor=module.vae_scale_factor,
            adapter_type="full_adapter",
        )
        zero_features(adapter)
        self.adapter = self._attach(module, "adapter", adapter.requires_grad_(True).train())
        return []

    def inject(
        self, unet: nn.Module, condition: torch.Tensor, strength: float = 1.0
    ) -> AbstractContextManager:
        if strength == 0:
            return nullcontext()
        features = [strength * f for f in self.adapter(condition.to(self.adapter.dtype))]

        def residuals(args: tuple, kwargs: dict) -> dict[str, Any]:
            batch = (args[0] if args else kwargs["sample"]).shape[0]
            # a fresh list per call: the UNet pops the features it uses
            return {"down_intrablock_additional_residuals": [_broadcast_to_batch(f, batch) for f in features]}

        return _pre_hook(unet, residuals)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def save_ecosystem(self, run: TrainedRun, folder: Path) -> dict[str, Path]:
        """`t2i_adapter/`: `T2IAdapter.from_pretrained(folder / "t2i_adapter")`, e.g. for diffusers'
        `StableDiffusionAdapterPipeline` over the base model."""
        self.adapter.save_pretrained(folder / "t2i_adapter", safe_serialization=True)
        return {"t2i_adapter": folder / "t2i_adapter"}


@torch.no_grad()
def zero_features(adapter: nn.Module) -> None:
    """Make every feature of a full T2I-Adapter exactly zero while keeping it trainable: its input convolution
    and every bias start at zero, so the body sees zeros and each residual block maps zero to zero (ReLU(0) =
    0); the random weights stay, and the first step's gradient reaches the input convolution through the
    residual paths of every level."""
    body = adapter.adapter
    nn.init.zeros_(body.conv_in.weight)
    for module in body.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            nn.init.zeros_(module.bias)


#: `method=<name>` -> class (what conf/method/<name>.yaml instantiates)
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (OFTControl, EncoderOnly, LoRA, ControlNet, T2IAdapter, FullFinetune)
}


# ---------------------------------------------------------------------------------------- ecosystem save
def save_ecosystem(run: TrainedRun, folder: str | os.PathLike) -> dict[str, Path]:
    """Save a trained run's parts in their ecosystem's formats under `folder`; returns `{format: folder}`.

    - `oft_control`: `peft/` (the rotations as a peft OFT adapter) and `control_encoder/`;
    - `encoder_only`: `control_encoder/`;
    - `lora`: `peft/` (a peft LoRA adapter: `PeftModel.from_pretrained(unet, folder / "peft")`) and
      `control_encoder/`;
    - `full_finetune`: `unet/` (`UNet2DConditionModel.from_pretrained`) and `control_encoder/`;
    - `controlnet`: `controlnet/` (`ControlNetModel.from_pretrained`);
    - `t2i_adapter`: `t2i_adapter/` (`T2IAdapter.from_pretrained`).

    `control_encoder/` is the project's own format (`src.models.exported.load_control_encoder`). Every call
    also writes `method.json`: the method's identity, condition and resolution, and what was written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    method: Method = run.module.method
    written = method.save_ecosystem(run, folder)
    info = {
        "method": method.identity(run.module.oft_config),
        "condition": run.condition,
        "resolution": run.resolution,
        "formats": {name: path.relative_to(folder).as_posix() for name, path in written.items()},
    }
    (folder / ECOSYSTEM_INFO).write_text(json.dumps(info, indent=2))
    return written
