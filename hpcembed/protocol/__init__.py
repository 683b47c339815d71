"""The protocol of a job, as state machines with no transport and no clock: one core per role (conductor,
tokenizer, encoder), each taking messages and returning the messages to send. roles/ drives them in real time
over a transport; scaling/sim.py drives them in virtual time. The messages are in messages.py."""
