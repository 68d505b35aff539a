"""dpgateway: a differentially private SQL query gateway."""

from dpgateway.errors import DPGatewayError
from dpgateway.gateway import Explanation, Gateway, Result

__version__ = "0.1.0"
__all__ = ["DPGatewayError", "Explanation", "Gateway", "Result", "__version__"]
