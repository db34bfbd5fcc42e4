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
from apimeta.apis.zoo import build_zoo, load_zoo, read_manifest

__all__ = [
    "OUTPUT_MODES",
    "APIInfo",
    "BlackBoxAPI",
    "LocalAPI",
    "QueryLedger",
    "build_zoo",
    "load_zoo",
    "parse_output_mode",
    "read_manifest",
    "restrict_output",
    "validate_query",
]
