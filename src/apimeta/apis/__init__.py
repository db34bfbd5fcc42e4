"""Black-box model APIs: the protocol, the query ledger and the backends."""

from apimeta.apis.base import (
    OUTPUT_MODES,
    APIInfo,
    BlackBoxAPI,
    parse_output_mode,
    restrict_output,
    validate_query,
)
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.local import LocalAPI

__all__ = [
    "OUTPUT_MODES",
    "APIInfo",
    "BlackBoxAPI",
    "LocalAPI",
    "QueryLedger",
    "parse_output_mode",
    "restrict_output",
    "validate_query",
]
