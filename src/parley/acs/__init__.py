"""Azure Communication Services Call Automation: answer and place calls, hang up, transfer.

`parley.acs.config` is light (settings import it); `parley.acs.service` and `parley.acs.routes` load
Microsoft's SDK and are imported only when ACS is configured.
"""
