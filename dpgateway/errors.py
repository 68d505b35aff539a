"""One exception hierarchy; every class carries the PostgreSQL SQLSTATE a client would see.

::

    DPGatewayError                      (XX000 unless a subclass says otherwise)
    ├── QuerySyntaxError                42601  the SQL does not parse
    ├── UnknownTableError               42P01  table not in the policy
    ├── UnknownColumnError              42703  column not in the policy
    ├── GroupingError                   42803  selected column neither grouped nor aggregated
    ├── PrivacyViolationError           42501  would release raw rows, identifiers or unbounded values
    ├── UnsupportedError                0A000  valid SQL that the gateway does not support (yet)
    ├── InvalidParameterError           22023  bad epsilon/delta or other argument
    ├── ConfigError                     F0000  the config or policy file is invalid
    ├── BudgetError                     53000  privacy budget exhausted
    │   └── QueryCapError               53400  one query asks for more than the per-query cap
    ├── AuthenticationError             28P01  unknown analyst or not allowed (e.g. not an admin)
    ├── BackendError                    58000  the data backend failed (message never echoes data)
    │   └── QueryCanceledError          57014  a CancelRequest stopped the backend query
    ├── FileAccessError                 58030  a file or folder dpgateway must write or read is not usable
    ├── PrerequisiteError               55000  the database lacks what a feature needs (e.g. a copy's trigger)
    └── InternalError                   XX000  a bug in dpgateway: please report it

Messages name the object, the rule that was broken and the fix.
"""

from __future__ import annotations


class DPGatewayError(Exception):
    """Base class: ``.sqlstate`` is the PostgreSQL error code, ``.message`` the text."""

    sqlstate = "XX000"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class QuerySyntaxError(DPGatewayError):
    """The SQL text does not parse."""

    sqlstate = "42601"


class UnknownTableError(DPGatewayError):
    """The query names a table the policy does not declare."""

    sqlstate = "42P01"


class UnknownColumnError(DPGatewayError):
    """The query names a column the policy does not declare."""

    sqlstate = "42703"


class GroupingError(DPGatewayError):
    """A selected column is neither in GROUP BY nor inside an aggregate."""

    sqlstate = "42803"


class PrivacyViolationError(DPGatewayError):
    """Answering would release raw rows, identifiers or unbounded values."""

    sqlstate = "42501"


class UnsupportedError(DPGatewayError):
    """Valid SQL that the gateway does not support."""

    sqlstate = "0A000"


class InvalidParameterError(DPGatewayError):
    """A bad argument such as ``epsilon <= 0``."""

    sqlstate = "22023"


class ConfigError(DPGatewayError):
    """The configuration or policy file is invalid."""

    sqlstate = "F0000"


class BudgetError(DPGatewayError):
    """The privacy budget of the analyst or of a subject domain would be exceeded."""

    sqlstate = "53000"


class QueryCapError(BudgetError):
    """A single query asks for more than the per-query cap."""

    sqlstate = "53400"


class AuthenticationError(DPGatewayError):
    """The caller is unknown or not allowed to do this."""

    sqlstate = "28P01"


class BackendError(DPGatewayError):
    """The data backend failed; the message never carries data values."""

    sqlstate = "58000"


class QueryCanceledError(BackendError):
    """The backend query was interrupted by a CancelRequest (``Connector.interrupt``)."""

    sqlstate = "57014"


class FileAccessError(DPGatewayError):
    """A file or folder that dpgateway writes or reads (ledger, chart, cache, demo files) is not usable."""

    sqlstate = "58030"


class PrerequisiteError(DPGatewayError):
    """The backend is not set up for the request (e.g. a PostgreSQL prepared copy's change trigger is missing)."""

    sqlstate = "55000"


class InternalError(DPGatewayError):
    """A bug in dpgateway."""

    sqlstate = "XX000"

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error (this is a bug in dpgateway, please report it): {message}")


ALL_ERRORS: tuple[type[DPGatewayError], ...] = (
    QuerySyntaxError,
    UnknownTableError,
    UnknownColumnError,
    GroupingError,
    PrivacyViolationError,
    UnsupportedError,
    InvalidParameterError,
    ConfigError,
    BudgetError,
    QueryCapError,
    AuthenticationError,
    BackendError,
    FileAccessError,
    InternalError,
)
