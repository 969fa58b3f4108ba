"""API schema bits; mirrors modules/api/models.py (ScriptArg, ScriptInfo)."""
from typing import Any, List, Optional

from pydantic import BaseModel, Field


class ScriptArg(BaseModel):  # mirrors modules/api/models.py (ScriptArg)
    label: Optional[str] = Field(default=None, title="Label")
    value: Optional[Any] = Field(default=None, title="Value")
    minimum: Optional[Any] = Field(default=None, title="Minimum")
    maximum: Optional[Any] = Field(default=None, title="Maximum")
    step: Optional[Any] = Field(default=None, title="Minimum")
    choices: Optional[List[str]] = Field(default=None, title="Choices")


class ScriptInfo(BaseModel):  # mirrors modules/api/models.py (ScriptInfo)
    name: Optional[str] = Field(default=None, title="Name")
    is_alwayson: Optional[bool] = Field(default=None, title="IsAlwayson")
    is_img2img: Optional[bool] = Field(default=None, title="IsImg2img")
    args: List[ScriptArg] = Field(title="Arguments")
