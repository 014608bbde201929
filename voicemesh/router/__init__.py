"""ServiceRouter: a stage's cached view of each session's config and its next hop.

Only routing lives here; the bus it publishes on is voicemesh.bus and the store it reads is
voicemesh.state, both of which sit below it and never import it.
"""

from voicemesh.router.service_router import NoRoute, ServiceRouter, publish_config_update

__all__ = ["NoRoute", "ServiceRouter", "publish_config_update"]
