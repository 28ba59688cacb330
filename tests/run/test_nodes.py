"""Each rank's node address, and the probe that tells a node that answers from one that does not."""

import socket

from moe_models.run.nodes import own_address, silent_nodes, why_silent


def test_the_address_that_reaches_the_master_is_the_nodes():
    assert own_address("127.0.0.1") == "127.0.0.1"


def test_a_node_that_refuses_answers():
    assert why_silent("127.0.0.1") is None  # nothing listens on the probe's port: refused at once
    assert silent_nodes({"127.0.0.1": [0, 1]}, own="127.0.0.2") == []  # another node, up
    assert silent_nodes({"127.0.0.1": [0, 1]}, own="127.0.0.1") == []  # only this node: nothing to ask


def test_a_node_without_a_route_is_named_with_its_ranks(monkeypatch):
    def unreachable(address, timeout=None):
        raise OSError(113, "No route to host")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert silent_nodes({"10.0.0.1": [0], "10.0.0.2": [1, 2]}, own="10.0.0.1") == [
        "10.0.0.2 (ranks 1, 2: No route to host)"]
