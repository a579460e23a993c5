// The load balancer on Azure Functions Flex Consumption, with a pool of Azure OpenAI accounts behind it.
// Every data-plane call uses one user-assigned identity: no storage keys, no OpenAI keys.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; seeds the resource group and the unique resource names.')
param environmentName string

@minLength(1)
@description('Region of the Function App, its storage and monitoring (must offer Flex Consumption).')
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of the user running azd. Optional: lets you run `python -m lb serve` against the real table and accounts.')
param principalId string = ''

// ---- Azure OpenAI pool ----
@description('One new Azure OpenAI account per region, each a backend of the pool.')
param openAiLocations array = ['eastus', 'northcentralus', 'eastus2']

@description('Balance these existing endpoints instead of creating accounts. Grant the identity "Cognitive Services OpenAI User" on each yourself.')
param existingOpenAiEndpoints array = []

@description('The same as a comma list, because azd environment values are strings (LB_EXISTING_OPENAI_ENDPOINTS).')
param existingOpenAiEndpointsCsv string = ''

param chatDeploymentName string = 'chat'
param chatModelName string = 'gpt-4o-mini'
param chatModelVersion string = '2024-07-18'
param chatSkuName string = 'GlobalStandard'
@description('Thousands of tokens per minute, per account.')
param chatCapacity int = 30

param embeddingDeploymentName string = 'embedding'
param embeddingModelName string = 'text-embedding-3-small'
param embeddingModelVersion string = '1'
param embeddingSkuName string = 'Standard'
@description('Thousands of tokens per minute, per account.')
param embeddingCapacity int = 30

// ---- Balancer ----
@description('Table holding the shared cooldowns.')
param stateTableName string = 'lbcooldowns'

@secure()
@description('Key clients must send (api-key or Bearer). Set LB_CLIENT_KEY to keep it stable across provisions.')
param clientKey string = ''

// newGuid() is only allowed in a parameter default, and it yields a new value on every deployment:
// without LB_CLIENT_KEY each `azd provision` rotates the key.
@secure()
@description('Fallback key when clientKey is empty. Leave unset.')
param generatedClientKey string = replace(newGuid(), '-', '')

@description('App (client) or object ids, comma-separated, whose Entra ID tokens the balancer accepts (e.g. the chat app identity).')
param entraAllowedClients string = ''

@description('Flex Consumption scale-out ceiling.')
param maximumInstanceCount int = 100

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var functionAppName = 'func-lb-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'

var existingEndpoints = concat(
  existingOpenAiEndpoints,
  filter(map(split(existingOpenAiEndpointsCsv, ','), e => trim(e)), e => !empty(e))
)
var createAccounts = empty(existingEndpoints)
var accountNames = [for (loc, i) in openAiLocations: 'oai-${resourceToken}-${i + 1}']
// The endpoint follows from customSubDomainName, so the URLs are known without waiting on the accounts.
var backendUrls = createAccounts ? map(accountNames, n => 'https://${n}.openai.azure.com') : existingEndpoints
var effectiveClientKey = empty(clientKey) ? generatedClientKey : clientKey

var openAiDeployments = [
  {
    name: chatDeploymentName
    model: chatModelName
    version: chatModelVersion
    skuName: chatSkuName
    capacity: chatCapacity
  }
  {
    name: embeddingDeploymentName
    model: embeddingModelName
    version: embeddingModelVersion
    skuName: embeddingSkuName
    capacity: embeddingCapacity
  }
]

// One BACKEND_{i}_* group per endpoint. DEPLOYMENTS only for accounts made here: existing endpoints
// may serve any deployment, and absent means "all".
// <app-settings>
var backendSettings = reduce(range(0, length(backendUrls)), {}, (acc, i) => union(
  acc,
  {
    'BACKEND_${i + 1}_URL': backendUrls[i]
    'BACKEND_${i + 1}_PRIORITY': '1'
    'BACKEND_${i + 1}_WEIGHT': '1'
  },
  createAccounts ? { 'BACKEND_${i + 1}_DEPLOYMENTS': '${chatDeploymentName},${embeddingDeploymentName}' } : {}
))
// </app-settings>

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-lb-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
    identityPrincipalId: identity.outputs.principalId
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    tableName: stateTableName
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
  }
}

module openAi 'app/openai.bicep' = [for (loc, i) in (createAccounts ? openAiLocations : []): {
  name: 'openai-${i + 1}'
  scope: rg
  params: {
    name: accountNames[i]
    location: loc
    tags: tags
    deployments: openAiDeployments
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
  }
}]

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    appInsightsName: monitoring.outputs.appInsightsName
    tableEndpoint: storage.outputs.tableEndpoint
    tableName: stateTableName
    backendSettings: backendSettings
    clientKey: effectiveClientKey
    entraAllowedClients: entraAllowedClients
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
  // The host must not start before it can read its storage and the accounts exist.
  dependsOn: [openAi]
}

// Values for `azd env set` in the chat app (azure-search-openai-demo). The client key is not here:
// read it from the app settings (see docs/deploy.md).
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output OPENAI_HOST string = 'azure_custom'
output AZURE_OPENAI_CUSTOM_URL string = api.outputs.uri
// Chat app versions that build an OpenAI client with base_url (not AzureOpenAI) need the /openai/v1 form.
output AZURE_OPENAI_CUSTOM_URL_V1 string = '${api.outputs.uri}/openai/v1'
output AZURE_OPENAI_CHATGPT_DEPLOYMENT string = chatDeploymentName
output AZURE_OPENAI_CHATGPT_MODEL string = chatModelName
output AZURE_OPENAI_EMB_DEPLOYMENT string = embeddingDeploymentName
output AZURE_OPENAI_EMB_MODEL_NAME string = embeddingModelName
output LB_CLIENT_KEY_SETTING string = 'LB_CLIENT_KEYS'
output LB_BACKEND_URLS array = backendUrls
