"""
Delivery over LMTP (RFC 2033) into the configured store: L{protocol} speaks
it, L{data} decodes the DATA section, L{delivery} maps recipients to users,
enforces quotas and opens the store's writers.
"""

from popserv.lmtp.delivery import Deliverer, Recipient, Refusal, Reply
from popserv.lmtp.protocol import LMTPFactory, LMTPProtocol

__all__ = ["LMTPFactory", "LMTPProtocol", "Deliverer", "Recipient", "Refusal", "Reply"]
