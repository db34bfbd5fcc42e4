"""Black-box model APIs: the protocol, the query ledger, the backends and the zoo.

``base`` (the contract, ``APIInfo``, the API-source registry), ``ledger``, ``cache``; backends
``local`` (in process; the ``torch`` source), ``onnx``, ``http`` (client) and ``server``; the
wire format ``v2``; zoos: ``manifest`` (zoo.json), ``recipe`` (training one API), ``zoo``
(building a zoo), ``describe`` (API descriptions of other people's models), ``sources``
(``load_zoo``), ``runtime`` (the APIs of a training run).
"""

from apimeta.apis.base import (
    API_SOURCES,
    OUTPUT_MODES,
    APIInfo,
    APISource,
    BlackBoxAPI,
    parse_output_mode,
    restrict_output,
    validate_query,
)
from apimeta.apis.ledger import QueryLedger, SharedLedger
from apimeta.apis.local import LocalAPI
from apimeta.apis.manifest import read_manifest
from apimeta.apis.sources import load_zoo
from apimeta.apis.zoo import build_zoo

__all__ = [
    "API_SOURCES",
    "OUTPUT_MODES",
    "APIInfo",
    "APISource",
    "BlackBoxAPI",
    "LocalAPI",
    "QueryLedger",
    "SharedLedger",
    "build_zoo",
    "load_zoo",
    "parse_output_mode",
    "read_manifest",
    "restrict_output",
    "validate_query",
]
