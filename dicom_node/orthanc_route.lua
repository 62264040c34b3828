-- Orthanc auto-routing rule for cag-node.
-- Forwards every stable XA series to the node; never forwards SR/KO or anything
-- the node itself sent back (else the report would loop back to the node).
-- Install: "LuaScripts": ["/path/to/orthanc_route.lua"] in Orthanc's JSON config,
-- with the node declared as the modality "node" in "DicomModalities".
-- __NODE_AET__ is the node's AE title.

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if modality == 'SR' or modality == 'KO' or modality == 'PR' then
    return
  end
  -- Who sent it?  Skip what came from the node.
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances > 0 then
    local origin = RestApiGet('/instances/' .. instances[1]['ID'] .. '/metadata/RemoteAET')
    if origin == '__NODE_AET__' then
      return
    end
  end
  if modality == 'XA' or modality == 'XRF' or modality == 'RF' then
    PrintRecursive('cag-node: forwarding series ' .. seriesId)
    SendToModality(seriesId, 'node')
  end
end
