"""Errors the platform reports to users; each names where the problem is."""


class SandError(Exception):
    """Base class: a problem a user can act on. The CLI prints it without a traceback."""


class ValidationError(SandError):
    """A record in an input file is malformed. Names the file, the record and the field."""

    def __init__(self, source: str, record: str | int, field: str, problem: str):
        self.source, self.record, self.field, self.problem = source, record, field, problem
        super().__init__(f"{source}: record {record}: field '{field}': {problem}")
