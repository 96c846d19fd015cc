"""Teacher families: one class per kind of diffusers pipeline, behind one interface
(:class:`~d2g_fast.teacher.families.base.TeacherFamily`; read its module docstring).

``FAMILIES`` maps a family name to its class; ``family_for_pipeline_class`` maps the
``_class_name`` of a folder's ``model_index.json`` to the class (the way torchtitan picks a
``TrainSpec`` by model name); ``load_teacher(folder)`` loads a folder as its family.
"""
from __future__ import annotations

import os

from d2g_fast.teacher.families.base import (Conditioning, NonFiniteLatentError, OneStepRule,
                                            TeacherFamily, clean_config, parse_dtype,
                                            read_model_index)
from d2g_fast.teacher.families.flux import FluxFamily
from d2g_fast.teacher.families.sd import SDFamily
from d2g_fast.teacher.families.sd3 import SD3Family
from d2g_fast.teacher.families.sdxl import SDXLFamily

FAMILIES: dict[str, type[TeacherFamily]] = {
    cls.name: cls for cls in (SDFamily, SDXLFamily, SD3Family, FluxFamily)}


def family_class(name: str) -> type[TeacherFamily]:
    """The family class of a family name ("sd", "sdxl", "sd3", "flux")."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family: unknown teacher family {name!r}; known: "
                         f"{sorted(FAMILIES)}") from None


def family_for_pipeline_class(class_name: str) -> type[TeacherFamily] | None:
    for cls in FAMILIES.values():
        if class_name in cls.pipeline_classes:
            return cls
    return None


def family_for_folder(path: str) -> type[TeacherFamily]:
    """The family of a local diffusers folder, from its ``model_index.json``: by pipeline class
    name, else (an unlisted UNet pipeline with the same parts) by its components."""
    index = read_model_index(path)
    cls = family_for_pipeline_class(index.get("_class_name", ""))
    if cls is not None:
        return cls
    if "unet" in index and os.path.isdir(os.path.join(path, "unet")):
        return SDXLFamily if index.get("text_encoder_2", [None])[0] else SDFamily
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"teacher (--teacher): {path!r} holds a {index.get('_class_name')!r}; "
                     f"supported pipelines: {known}")


def load_teacher(path: str, *, dtype="float32", device="cpu", resolution=None) -> TeacherFamily:
    """Load a local diffusers folder as its teacher family (never downloads)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher (--teacher): no such folder {path!r}")
    return family_for_folder(path).from_pretrained(path, dtype=dtype, device=device,
                                                   resolution=resolution)


def check_teacher_folder(path: str, resolution=None) -> type[TeacherFamily]:
    """Refuse a teacher folder from its JSON files alone (nothing loaded, nothing written):
    not a folder, an unsupported pipeline, a missing part (a transformer without its VAE), a
    resolution the family's patch grid cannot divide. Returns the family class."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher (--teacher): no such folder {path!r}")
    cls = family_for_folder(path)
    cls.check_folder(path, resolution)
    return cls


def family_for_pipeline(pipe) -> type[TeacherFamily]:
    cls = family_for_pipeline_class(type(pipe).__name__)
    if cls is not None:
        return cls
    comps = pipe.components
    if comps.get("unet") is not None:
        return SDXLFamily if comps.get("text_encoder_2") is not None else SDFamily
    raise ValueError(f"pipe: {type(pipe).__name__} is not a supported teacher pipeline")


__all__ = ["FAMILIES", "TeacherFamily", "Conditioning", "OneStepRule", "NonFiniteLatentError",
           "SDFamily", "SDXLFamily", "SD3Family", "FluxFamily", "family_class",
           "family_for_folder", "family_for_pipeline", "family_for_pipeline_class",
           "check_teacher_folder", "load_teacher", "clean_config", "parse_dtype"]
