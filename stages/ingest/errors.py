"""The ingest stage's one error: input that cannot be ingested, named by file, row or line, and field."""

from __future__ import annotations

from schemas.base import UserInputError
from stages.ingest.formats import Problem


class IngestError(UserInputError):
    """Input that cannot be ingested. The message is one line naming the file, the row or line and the field."""

    def __init__(self, file: str, where: str, message: str):
        self.file, self.where = file, where
        text = f"{file}: {where}: {message}" if where else f"{file}: {message}"
        super().__init__(" ".join(text.splitlines()))

    @classmethod
    def invalid_row(cls, file: str, row: int, problem: Problem) -> IngestError:
        return cls(
            file,
            f"row {row}, field {problem.field!r}",
            f"{problem.detail} [{problem.reason}]; fix the row or set data.on_invalid=quarantine to set it aside",
        )
