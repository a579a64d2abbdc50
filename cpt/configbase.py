"""The base class of every config section (kept apart so component modules can import it)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors, so a typo in a YAML config never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
