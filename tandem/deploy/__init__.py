"""Scale-out: Tandem replicas behind Ray Serve (`tandem serve --replicas N`, `pip install 'tandem[ray]'`).

tandem.deploy.request and tandem.deploy.options import without Ray; tandem.deploy.ray needs it.
See docs/scale-out.md.
"""
