"""scalebox-local: an embedded sandbox server speaking the Scalebox wire protocol (REST control plane under /v1,
each sandbox's Connect agent under /sbx/<id>)."""
