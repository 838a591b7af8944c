"""Monitoring: who scrapes whom, and the files Prometheus and the exporters are given.

Pure logic, no pyinfra, in three modules: ``settings`` (the rows), ``scrape`` (who
scrapes whom, and Prometheus's files), ``exporters`` (the node and GPU exporters on served
hosts). The hosts of the inventory group ``monitoring`` run Prometheus and scrape every
llama-server of the inventory, plus a node exporter on every served host and a GPU
exporter on the GPU hosts.
"""
