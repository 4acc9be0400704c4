"""Delivery: what leaves as an answer, exactly once. Owns the outbox and the de-duplication of
request ids (`outbox.Delivery`), the state store on disk (`store.Store`, sqlite3, as is the
event history's `history.HistoryStore`) and the delivery-writer thread, the one thread that
touches that store (`writer.Writer`).

Callers hand it a getter of the current broker link, typed by `ports.Link` (publish, ack), and
the messages to acknowledge, typed by `ports.Delivered`. It never imports `mqtt/` (nor paho),
`work/` or `daemon/`: a request travels down to here, never back up.
"""
