"""What profiles switch on, applied from outside the networks: profiles, memory planning, offload, quantisation, step savers, attention, compile."""
