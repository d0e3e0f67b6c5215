"""The built-in synthetic multimodal world (design.md §6): scenes and their rendering
(`scenes`), the exact scene parser (`parser`), captions and visual questions as structured
templates (`captions`), general and out-of-distribution text (`text`), clips of scenes evolving
under actions written as text (`clips`), and the registry of document generators where new
kinds of world data plug in (`generators`)."""

from moesaic.data.world.captions import REGISTERS, attribute_phrases, caption, question_answer
from moesaic.data.world.clips import Action, Clip, action_text, apply, sample_clip
from moesaic.data.world.generators import GENERATORS, Record, WorldSource, register
from moesaic.data.world.parser import ParsedScene, parse_scene, parse_scenes
from moesaic.data.world.scenes import Scene, SceneObject, render, sample_scene

__all__ = [
    "GENERATORS",
    "Action",
    "Clip",
    "REGISTERS",
    "ParsedScene",
    "Record",
    "Scene",
    "SceneObject",
    "WorldSource",
    "action_text",
    "apply",
    "attribute_phrases",
    "caption",
    "parse_scene",
    "parse_scenes",
    "question_answer",
    "register",
    "render",
    "sample_clip",
    "sample_scene",
]
