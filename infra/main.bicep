// The load balancer on Azure Functions Flex Consumption, with a pool of Azure OpenAI accounts behind it.
// Every data-plane call uses one user-assigned identity: no storage keys, no OpenAI keys.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; seeds the resource group and the unique resource names.')
param environmentName string

// Regions that offer Flex Consumption (docs/deployment.md cites the list; `az functionapp
// list-flexconsumption-locations` prints today's). azd offers only these when it asks.
@minLength(1)
@description('Region of the Function App, its storage and monitoring (must offer Flex Consumption).')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of the user running azd. Optional: lets you run `python -m lb serve` against the real table and accounts.')
param principalId string = ''

// ---- Azure OpenAI pool ----
// Every value below can be set with `azd env set <NAME> <value>` (infra/main.parameters.json maps
// the names); infra/hooks/preprovision.* checks the models, versions and SKUs in every region first.
@description('One new Azure OpenAI account per region, each a backend of the pool.')
param openAiLocations array = ['eastus', 'northcentralus', 'eastus2']

@description('The same as a comma list, because azd environment values are strings (LB_OPENAI_LOCATIONS); wins when set.')
param openAiLocationsCsv string = ''

@description('Balance these existing endpoints instead of creating accounts. Grant the identity "Cognitive Services OpenAI User" on each yourself.')
param existingOpenAiEndpoints array = []

@description('The same as a comma list, because azd environment values are strings (LB_EXISTING_OPENAI_ENDPOINTS).')
param existingOpenAiEndpointsCsv string = ''

// Defaults: GA models not retiring before 2027 in Microsoft Learn's retirement schedule, the
// ones azure-search-openai-demo deploys (docs/deployment.md cites both).
@minLength(1)
param chatDeploymentName string = 'chat'
@minLength(1)
param chatModelName string = 'gpt-5.4-mini'
@minLength(1)
param chatModelVersion string = '2026-03-17'
@description('Deployment type: GlobalStandard where the model offers it.')
param chatSkuName string = 'GlobalStandard'
@minValue(1)
@description('Thousands of tokens per minute, per account.')
param chatCapacity int = 30

@minLength(1)
param embeddingDeploymentName string = 'embedding'
@minLength(1)
param embeddingModelName string = 'text-embedding-3-large'
@minLength(1)
param embeddingModelVersion string = '1'
param embeddingSkuName string = 'GlobalStandard'
@minValue(1)
@description('Thousands of tokens per minute, per account.')
param embeddingCapacity int = 30
@minValue(1)
@description('Vector length chat apps ask for (`dimensions`); text-embedding-3-large gives up to 3072, -3-small up to 1536.')
param embeddingDimensions int = 3072

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

@description('Client names (key names such as key1, or Entra object ids) that may read /lb/status and every client\'s /lb/usage.')
param adminClients string = ''

// Flex accepts 40-1000 (Microsoft Learn, Flex Consumption considerations, as stored 2026-12-07); it
// counts on-demand instances per function group, and a burst may briefly exceed it (docs/deployment.md).
@minValue(40)
@maxValue(1000)
@description('Flex Consumption scale-out ceiling (LB_MAXIMUM_INSTANCE_COUNT).')
param maximumInstanceCount int = 100

@allowed([512, 2048, 4096])
@description('Flex Consumption instance size (LB_INSTANCE_MEMORY_MB).')
param instanceMemoryMB int = 2048

// Flex runs a Python app one HTTP request per instance unless this is set (Microsoft Learn,
// HTTP trigger concurrency). lb is async: one process holds hundreds of streams; the default is
// the measured figure with margin (docs/performance.md, `python -m bench concurrency`).
@minValue(1)
@maxValue(1000)
@description('Concurrent HTTP requests per instance before Flex adds one (LB_PER_INSTANCE_CONCURRENCY).')
param perInstanceConcurrency int = 50

// Always-ready instances skip the cold start, and are billed while idle (docs/deployment.md, Cost).
@minValue(0)
@maxValue(1000)
@description('Instances kept running for the HTTP functions even with no traffic (LB_ALWAYS_READY_INSTANCES).')
param alwaysReadyInstances int = 0

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var functionAppName = 'func-lb-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'

var existingEndpoints = concat(
  existingOpenAiEndpoints,
  filter(map(split(existingOpenAiEndpointsCsv, ','), e => trim(e)), e => !empty(e))
)
var createAccounts = empty(existingEndpoints)
var poolLocations = empty(trim(openAiLocationsCsv))
  ? openAiLocations
  : filter(map(split(openAiLocationsCsv, ','), l => trim(l)), l => !empty(l))
var accountNames = [for (loc, i) in poolLocations: 'oai-${resourceToken}-${i + 1}']
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

module openAi 'app/openai.bicep' = [for (loc, i) in (createAccounts ? poolLocations : []): {
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
    adminClients: adminClients
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    perInstanceConcurrency: perInstanceConcurrency
    alwaysReadyInstances: alwaysReadyInstances
  }
  // The host must not start before it can read its storage and the accounts exist.
  dependsOn: [openAi]
}

// Values for `azd env set` in the chat apps (docs/chat-apps.md). The client key is not here:
// read it from the app settings (docs/deployment.md).
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
// The balancer's base URL: openai-chat-app-quickstart's AZURE_OPENAI_ENDPOINT (it appends /openai/v1/).
output LB_URL string = api.outputs.uri
// azure-search-openai-demo builds AsyncOpenAI(base_url=AZURE_OPENAI_CUSTOM_URL): the /openai/v1 form.
output OPENAI_HOST string = 'azure_custom'
output AZURE_OPENAI_CUSTOM_URL string = '${api.outputs.uri}/openai/v1'
output AZURE_OPENAI_CHATGPT_DEPLOYMENT string = chatDeploymentName
output AZURE_OPENAI_CHATGPT_MODEL string = chatModelName
output AZURE_OPENAI_CHAT_DEPLOYMENT string = chatDeploymentName
output AZURE_OPENAI_EMB_DEPLOYMENT string = embeddingDeploymentName
output AZURE_OPENAI_EMB_MODEL_NAME string = embeddingModelName
output AZURE_OPENAI_EMB_DIMENSIONS int = embeddingDimensions
output LB_CLIENT_KEY_SETTING string = 'LB_CLIENT_KEYS'
output LB_BACKEND_URLS array = backendUrls
