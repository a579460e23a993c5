// The one identity the Function App uses for storage, the cooldown table, App Insights and Azure OpenAI.
// User-assigned so its roles exist before the app does (no start-up race on first deploy).
param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
