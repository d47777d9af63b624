"""The test bed: what tests, benchmarks and the demo run against.

An Asterisk root and its runs (`pbx`), Redis, Sentinel and Cluster servers (`servers`,
`cluster`), an SMTP sink, the FastAGI and AMI peers, the SIP load generator, the AMI
recorders and their recordings (`recordings/`), and the demo. Not shipped in the wheel.
"""
