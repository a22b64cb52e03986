"""Everything that talks to Ray: the session, the trainer and its events, placement, the node cache, fan-out, jobs."""
