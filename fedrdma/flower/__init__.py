"""fedrdma as the data plane of Flower apps: a Strategy wrapper and a ClientApp mod.

Flower's messages keep carrying what they carry best, small records (metrics, config), and
a descriptor of where the arrays are; the arrays move between the sites' `fedrdma node`s.
The change in a Flower app is one line on each side:

    strategy = FedRDMA(FedAvg(...), site="agg")        # ServerApp
    app = ClientApp(mods=[fedrdma_mod])                 # ClientApp

Needs the `flower` extra (`pip install fedrdma[flower]`); `records.py` maps ArrayRecords to
pools, `descriptor.py` is what rides in the ConfigRecord.
"""
